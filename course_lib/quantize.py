"""Quantize after pruning: AWQ INT4 (autoawq) for the decoder, torchao int8 for a CPU speedup.

Order matters: prune -> recover -> quantize. Packed INT4 weights cannot be sliced, so
``surgery.apply_plan`` refuses a model that carries a ``quantization_config``; both functions
here set one.

AWQ on a CPU: autoawq 0.2.9 searches its scales and packs the weights on the CPU, and its
``WQLinear_GEMM`` layers fall back to dequantise-then-matmul in plain torch when the CUDA
extension is absent, so the quantized model can be evaluated in memory (slowly: this path is for
quality, not speed). Loading a *saved* AWQ checkpoint needs the GPU kernels; that step is only
done where a GPU is present.
"""

from __future__ import annotations

import torch
from torch import nn

from .pruned_modeling import adapter_for

AWQ_ROW_BATCH = 64  # autoawq 0.2.9 searches clipping ranges over output rows in batches of 64


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    adapter = adapter_for(model)
    found = []
    for i, block in enumerate(adapter.blocks(model)):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                found.append((f"layer {i} {name}", module))
    return found


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Raise ``ValueError`` naming the first layer whose widths AWQ cannot quantize.

    AWQ quantizes each output row in groups of ``group_size`` input columns, so pruned input
    widths must stay divisible (ask selection for ``quant_group_size``); its clipping search also
    walks output rows in batches of 64, so output widths must be multiples of 64.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    for name, linear in _block_linears(model):
        if linear.in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide the input width {linear.in_features} of "
                             f"{name}; prune to multiples of {group_size} (selection's quant_group_size) or "
                             "choose a group size that divides every width")
        if linear.out_features % AWQ_ROW_BATCH:
            raise ValueError(f"the output width {linear.out_features} of {name} is not a multiple of "
                             f"{AWQ_ROW_BATCH}, which AWQ's clipping search needs")


def awq_int4(model: nn.Module, calib: torch.Tensor, *, group_size: int = 64, zero_point: bool = True) -> nn.Module:
    """AWQ 4-bit weight quantization of a Llama-family model, in place; returns the model.

    ``calib``: LongTensor [N, T] of real text (``data.calibration_batches``), never a repeated
    dummy sentence: AWQ picks its per-channel scales from these activations.
    """
    from awq.models.llama import LlamaAWQForCausalLM

    if adapter_for(model).name != "llama":
        raise ValueError(f"AWQ here supports the Llama family; got {adapter_for(model).name!r}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("model is already quantized")
    calib = torch.as_tensor(calib)
    if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
        raise ValueError(f"calib must be a LongTensor [N >= 1, T >= 2], got shape {tuple(calib.shape)}")
    check_group_size(model, group_size)
    quant_config = {"zero_point": zero_point, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}
    wrapper = LlamaAWQForCausalLM(model, "llama", False, model.config, quant_config, None)
    # With a KV cache, autoawq 0.2.9 captures the cache among the block's arguments and every step of
    # its scale search appends to it, so attention sees stale keys and the chosen scales are wrong.
    use_cache, model.config.use_cache = model.config.use_cache, False
    try:
        wrapper.quantize(None, quant_config=quant_config, calib_data=calib.tolist(),
                         max_calib_samples=calib.shape[0], max_calib_seq_len=calib.shape[1])
    finally:
        model.config.use_cache = use_cache
    model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                        "zero_point": zero_point, "version": "gemm"}
    return model.eval()


def int8_dynamic(model: nn.Module) -> nn.Module:
    """torchao int8 weights with int8 dynamic activations on every block linear, in place.

    A CPU path with real speedups: the matmuls run in int8. Embeddings and the LM head stay fp32.
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("model is already quantized")
    linears = {id(m) for _, m in _block_linears(model)}
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _: id(m) in linears)
    model.config.quantization_config = {"quant_method": "torchao", "quant_type": "int8_dynamic_activation_int8_weight"}
    return model.eval()
