"""Quantize after pruning: AWQ INT4 (autoawq) for the decoder, torchao int8 for a CPU speedup.

Order matters: prune -> recover -> quantize. Packed INT4 weights cannot be sliced, so
``surgery.apply_plan`` refuses a model that carries a ``quantization_config``; every function
here that rounds weights sets one.

AWQ on a CPU: autoawq 0.2.9 searches its scales and packs the weights on the CPU, and its
``WQLinear_GEMM`` layers fall back to dequantise-then-matmul in plain torch when the CUDA
extension is absent, so the quantized model can be evaluated in memory (slowly: this path is for
quality, not speed). ``save_awq`` writes the packed model as a checkpoint and ``load_awq`` reads
it back on any device (transformers' own AWQ loader wants gptqmodel, not part of this stack).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import awq_search
from .paths import staged_directory
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


def _check_columns(model: nn.Module, group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    for name, linear in _block_linears(model):
        if linear.in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide the input width {linear.in_features} of "
                             f"{name}; prune to multiples of {group_size} (selection's quant_group_size) or "
                             "choose a group size that divides every width")


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Raise ``ValueError`` naming the first layer whose widths AWQ cannot quantize.

    AWQ quantizes each output row in groups of ``group_size`` input columns, so pruned input
    widths must stay divisible (ask selection for ``quant_group_size``); its clipping search also
    walks output rows in batches of 64, so output widths must be multiples of 64.
    """
    _check_columns(model, group_size)
    for name, linear in _block_linears(model):
        if linear.out_features % AWQ_ROW_BATCH:
            raise ValueError(f"the output width {linear.out_features} of {name} is not a multiple of "
                             f"{AWQ_ROW_BATCH}, which AWQ's clipping search needs")


def _run_awq(model: nn.Module, calib, *, group_size: int, zero_point: bool, clip: bool, quantize: bool) -> nn.Module:
    """Validate, then run autoawq's search (and, with ``quantize``, its INT4 packing) in place."""
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
    # its scale search appends to it, so attention would see stale keys.
    use_cache, model.config.use_cache = model.config.use_cache, False
    try:
        wrapper.quantize(None, quant_config=quant_config, calib_data=calib.tolist(), apply_clip=clip,
                         export_compatible=not quantize, quantizer_cls=awq_search.quantizer_cls(),
                         max_calib_samples=calib.shape[0], max_calib_seq_len=calib.shape[1])
    finally:
        model.config.use_cache = use_cache
    return model.eval()


def awq_int4(model: nn.Module, calib: torch.Tensor, *, group_size: int = 64, zero_point: bool = True,
             clip: bool = True) -> nn.Module:
    """AWQ 4-bit weight quantization of a Llama-family model, in place; returns the model.

    ``calib``: LongTensor [N, T] of real text (``data.calibration_batches``), never a repeated
    dummy sentence: AWQ picks its per-channel scales from these activations. ``clip`` also
    searches a clipping range per weight group (autoawq's default).
    """
    _run_awq(model, calib, group_size=group_size, zero_point=zero_point, clip=clip, quantize=True)
    model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                        "zero_point": zero_point, "version": "gemm"}
    return model


def save_awq(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write an ``awq_int4`` model as a Hugging Face checkpoint, all or nothing.

    The safetensors hold the packed INT4 tensors (``qweight``, ``qzeros``, ``scales`` per linear) and
    ``config.json`` holds ``quantization_config`` in the AWQ format transformers reads.
    """
    config = getattr(model.config, "quantization_config", None) or {}
    if config.get("quant_method") != "awq":
        raise ValueError("model is not AWQ-quantized: run awq_int4 on it first")
    directory = Path(directory)
    with staged_directory(directory) as staged:
        model.save_pretrained(staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
    return directory


def load_awq(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by ``save_awq``, on a CPU as well as a GPU; returns it in eval mode.

    transformers 5.17 loads AWQ checkpoints only through gptqmodel, which is not part of this
    course's stack ("Loading an AWQ quantized model requires gptqmodel"). The checkpoint is nothing
    but packed tensors, so this builds the model from its config (pruned widths included), puts
    autoawq's ``WQLinear_GEMM`` of the right shape in place of every block linear and loads the
    tensors strictly: anything missing or left over is an error.
    """
    from awq.modules.linear import WQLinear_GEMM
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    quant = getattr(config, "quantization_config", None) or {}
    if quant.get("quant_method") != "awq":
        raise ValueError(f"{directory} is not an AWQ checkpoint (quantization_config: {quant or None})")
    del config.quantization_config  # else transformers would hand loading to gptqmodel
    model = AutoModelForCausalLM.from_config(config)
    for block in adapter_for(model).blocks(model):
        for name, linear in list(block.named_modules()):
            if isinstance(linear, nn.Linear):
                block.set_submodule(name, WQLinear_GEMM(quant["bits"], quant["group_size"], linear.in_features,
                                                        linear.out_features, linear.bias is not None, "cpu"))
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{directory} does not match its config: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.config.quantization_config = quant
    return model.eval()


def awq_rescale(model: nn.Module, calib: torch.Tensor, *, group_size: int = 64, clip: bool = False) -> nn.Module:
    """Only AWQ's search, applied in fp32: the model whose weights ``awq_int4`` would round.

    Each RMSNorm weight is divided by the per-channel scales its following linears' columns are
    multiplied by (and up_proj's rows for down_proj's columns), so with ``clip=False`` the
    model computes the same function as before, up to float rounding: the INT4 rounding that
    follows is what the scales make kinder to salient channels. ``clip=True`` also clamps each
    weight group to its searched range, which does change the function.
    """
    return _run_awq(model, calib, group_size=group_size, zero_point=True, clip=clip, quantize=False)


def rtn_int4(model: nn.Module, *, group_size: int = 64) -> nn.Module:
    """Round-to-nearest INT4 (asymmetric, one scale and zero point per group), simulated in fp32.

    The baseline AWQ is measured against: the same grid and groups, no calibration. Weights are
    rounded and stored back in fp32, so this is a quality reference, not a smaller model; the
    config is marked quantized so surgery refuses it like any other quantized model.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("model is already quantized")
    _check_columns(model, group_size)
    with torch.no_grad():
        for _, linear in _block_linears(model):
            linear.weight.copy_(fake_quantize(linear.weight, group_size=group_size))
    model.config.quantization_config = {"quant_method": "rtn", "bits": 4, "group_size": group_size,
                                        "simulated": True}
    return model.eval()


def fake_quantize(weight: torch.Tensor, *, group_size: int, bits: int = 4) -> torch.Tensor:
    """``weight`` rounded to ``bits``-bit integers per group of ``group_size`` input columns and back.

    Asymmetric: each group maps [min, max] onto 0 .. 2**bits - 1 with a zero point, as AWQ's
    ``zero_point=True`` packing does.
    """
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {cols} input columns")
    groups = weight.reshape(-1, group_size)
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    top = 2**bits - 1
    scale = (high - low).clamp(min=1e-5) / top
    zero = (-torch.round(low / scale)).clamp(0, top)
    levels = torch.clamp(torch.round(groups / scale) + zero, 0, top)
    return ((levels - zero) * scale).reshape(rows, cols)


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
