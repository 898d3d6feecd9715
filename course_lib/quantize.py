"""Quantize after pruning: INT4 with AWQ's scales on a CPU kernel, AWQ checkpoints for GPU serving,
weight-only INT8 and bf16, and round-to-nearest INT4 as the baseline.

Order matters: prune -> recover -> quantize. Packed weights cannot be sliced, so
``surgery.apply_plan`` refuses a model that carries a ``quantization_config``; every function
here that rounds weights sets one.

What each is for (``--quantize`` in the CLI):

* ``int4``: AWQ's search (autoawq 0.2.9, repaired for the CPU in ``awq_search``) picks the scales
  and the integer grid; the integers then run on PyTorch's CPU int4 kernel (``lowbit.Int4Linear``)
  in bf16, with the LM head in INT8. ``onnx_decoder.OrtDecoder`` runs the same integers on ONNX
  Runtime's int4 x int8 kernel, the fast path on CPUs without fast bf16 arithmetic.
* ``awq``: the same search, packed by autoawq as a checkpoint for its CUDA kernels. On a CPU its
  ``WQLinear_GEMM`` layers dequantise every weight on every call: a quality check, not a speed path.
* ``int8``: every block linear and the LM head as weight-only INT8 (``lowbit.Int8Linear``), bf16.
* ``bf16``: the whole model cast to bf16.
* ``rtn``: round-to-nearest INT4 on AWQ's grid without calibration, simulated in fp32: the
  quality AWQ has to beat.

``save_awq`` / ``load_awq`` and ``lowbit.save`` / ``lowbit.load`` write and read the checkpoints
(safetensors) on any device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import SettingError
from . import awq_search, lowbit
from .paths import staged_directory
from .pruned_modeling import adapter_for

AWQ_ROW_BATCH = 64  # autoawq 0.2.9 searches clipping ranges over output rows in batches of 64


def _check_unquantized(model: nn.Module) -> None:
    if getattr(model.config, "quantization_config", None) is not None:
        raise SettingError("model is already quantized")


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(module path, linear) for every linear inside the model's blocks, in order."""
    blocks = {id(block) for block in adapter_for(model).blocks(model)}
    return [(f"{path}.{name}", linear) for path, block in model.named_modules() if id(block) in blocks
            for name, linear in block.named_modules() if isinstance(linear, nn.Linear)]


def _check_columns(model: nn.Module, group_size: int) -> None:
    if group_size < 1:
        raise SettingError(f"group_size must be >= 1, got {group_size}")
    for name, linear in _block_linears(model):
        if linear.in_features % group_size:
            raise SettingError(f"group_size={group_size} does not divide the input width {linear.in_features} of "
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
            raise SettingError(f"the output width {linear.out_features} of {name} is not a multiple of "
                               f"{AWQ_ROW_BATCH}, which AWQ's clipping search needs")


def _run_awq(model: nn.Module, calib, *, group_size: int, zero_point: bool, clip: bool, quantize: bool) -> nn.Module:
    """Validate, then run autoawq's search (and, with ``quantize``, its INT4 packing) in place."""
    from awq.models.llama import LlamaAWQForCausalLM

    if adapter_for(model).name != "llama":
        raise SettingError(f"AWQ here supports the Llama family; got {adapter_for(model).name!r}")
    _check_unquantized(model)
    calib = torch.as_tensor(calib)
    if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
        raise SettingError(f"calib must be a LongTensor [N >= 1, T >= 2], got shape {tuple(calib.shape)}")
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
        raise SettingError("model is not AWQ-quantized: run awq_int4 on it first")
    directory = Path(directory)
    with staged_directory(directory) as staged:
        model.save_pretrained(staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
    return directory


def load_awq(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by ``save_awq``, on a CPU as well as a GPU; returns it in eval mode.

    transformers 5.17 loads AWQ checkpoints only through gptqmodel ("Loading an AWQ quantized model
    requires gptqmodel"); this puts autoawq's ``WQLinear_GEMM`` of the right shape in place of every
    block linear instead (``lowbit.build_from_checkpoint``).
    """
    from awq.modules.linear import WQLinear_GEMM

    def rebuild(model: nn.Module, quant: dict) -> None:
        for block in adapter_for(model).blocks(model):
            for name, linear in list(block.named_modules()):
                if isinstance(linear, nn.Linear):
                    block.set_submodule(name, WQLinear_GEMM(quant["bits"], quant["group_size"], linear.in_features,
                                                            linear.out_features, linear.bias is not None, "cpu"))

    return lowbit.build_from_checkpoint(directory, "awq", rebuild)


def awq_rescale(model: nn.Module, calib: torch.Tensor, *, group_size: int = 64, clip: bool = False) -> nn.Module:
    """Only AWQ's search, applied in fp32: the model whose weights ``awq_int4`` would round.

    Each RMSNorm weight is divided by the per-channel scales its following linears' columns are
    multiplied by (and up_proj's rows for down_proj's columns), so with ``clip=False`` the
    model computes the same function as before, up to float rounding: the INT4 rounding that
    follows is what the scales make kinder to salient channels. ``clip=True`` also clamps each
    weight group to its searched range, which does change the function.
    """
    return _run_awq(model, calib, group_size=group_size, zero_point=True, clip=clip, quantize=False)


def rtn_int4(model: nn.Module, *, group_size: int = 64, zero_point: str = "integer") -> nn.Module:
    """Round-to-nearest INT4 (asymmetric, one scale and zero point per group), simulated in fp32.

    The baseline AWQ is measured against: the same grid and groups, no calibration. Weights are
    rounded and stored back in fp32, so this is a quality reference, not a smaller model; the
    config is marked quantized so surgery refuses it like any other quantized model.
    ``zero_point``: see ``quantize_groups``.
    """
    _check_zero_point(zero_point)
    _check_unquantized(model)
    _check_columns(model, group_size)
    with torch.no_grad():
        for _, linear in _block_linears(model):
            linear.weight.copy_(fake_quantize(linear.weight, group_size=group_size, zero_point=zero_point))
    model.config.quantization_config = {"quant_method": "rtn", "bits": 4, "group_size": group_size,
                                        "zero_point": zero_point, "simulated": True}
    return model.eval()


ZERO_POINTS = ("integer", "float")


def _check_zero_point(zero_point: str) -> None:
    if zero_point not in ZERO_POINTS:
        raise SettingError(f"zero_point must be one of {', '.join(ZERO_POINTS)}; got {zero_point!r}")


def quantize_groups(weight: torch.Tensor, *, group_size: int, bits: int = 4, zero_point: str = "integer"):
    """``weight`` [out, in] on an asymmetric grid per group of ``group_size`` input columns.

    Each group maps [min, max] onto 0 .. 2**bits - 1. Returns ``(levels, scales, zeros)``: integers
    [out, in], scales and zero points [out, in / group_size], with ``weight ~ (levels - zeros) * scales``.
    ``zero_point="integer"`` rounds the zero point to a level, as AWQ's ``zero_point=True`` packing
    stores it, so the grid sits on multiples of the scale and the group's min may fall between two
    levels. ``"float"`` keeps it unrounded, as GGUF's Q4_1 (a scale and a minimum per block) and the
    CPU int4 kernel's float offsets do: the min is a level exactly.
    """
    _check_zero_point(zero_point)
    rows, cols = weight.shape
    if cols % group_size:
        raise SettingError(f"group_size={group_size} does not divide the {cols} input columns")
    groups = weight.reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    top = 2**bits - 1
    scales = (high - low).clamp(min=1e-5) / top
    if zero_point == "integer":
        zeros = (-torch.round(low / scales)).clamp(0, top)
        levels = torch.clamp(torch.round(groups / scales) + zeros, 0, top)
    else:
        zeros = -low / scales
        levels = torch.clamp(torch.round((groups - low) / scales), 0, top)
    return levels.reshape(rows, cols), scales.squeeze(-1), zeros.squeeze(-1)


def fake_quantize(weight: torch.Tensor, *, group_size: int, bits: int = 4, zero_point: str = "integer") -> torch.Tensor:
    """``weight`` rounded to ``quantize_groups``' grid and back, in its own dtype."""
    levels, scales, zeros = quantize_groups(weight, group_size=group_size, bits=bits, zero_point=zero_point)
    rows, cols = weight.shape
    return ((levels.reshape(rows, -1, group_size) - zeros[..., None]) * scales[..., None]).reshape(rows, cols)


def _output_head(model: nn.Module) -> nn.Linear | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _finish(model: nn.Module, scheme: str, **details) -> nn.Module:
    """The LM head (if any) to INT8, tied input embeddings reading its rows, the rest to bf16; marked."""
    head = _output_head(model)
    if head is not None:
        tied = head.weight is model.get_input_embeddings().weight
        quantized = lowbit.Int8Linear.from_linear(head)
        model.set_output_embeddings(quantized)
        if tied:
            model.set_input_embeddings(lowbit.Int8TiedEmbedding(quantized))
        details["tied_embeddings"] = tied
    model.to(lowbit.COMPUTE_DTYPE)
    return lowbit.mark(model, scheme, **details).eval()


def _check_int8_head(model: nn.Module) -> None:
    head = _output_head(model)
    if head is not None:
        lowbit.check_int8_shape("the LM head", head.in_features)


def _check_int4_shapes(model: nn.Module, group_size: int) -> None:
    """What ``int4`` needs: every block linear a shape the CPU int4 kernel takes, the LM head one int8 takes."""
    for name, linear in _block_linears(model):
        lowbit.check_int4_shape(name, linear.in_features, linear.out_features, group_size)
    _check_int8_head(model)


def _check_int8_shapes(model: nn.Module) -> None:
    """What ``int8`` needs: every block linear and the LM head an input width the CPU int8 kernel takes."""
    for name, linear in _block_linears(model):
        lowbit.check_int8_shape(name, linear.in_features)
    _check_int8_head(model)


AWQ_SEARCHED = ("int4", "awq")  # the formats whose grid comes from AWQ's search (pipeline.QUANTIZERS' names)


def check_formats(model: nn.Module, formats, group_size: int) -> None:
    """Every check the quantizers of ``formats`` make before their work, on ``model``'s shapes alone.

    A model built on the meta device will do: the pipeline runs this on the model its dry run
    pruned, so that a width no kernel takes stops a run before any scoring, not after it.
    """
    searched = [name for name in formats if name in AWQ_SEARCHED]
    if searched and adapter_for(model).name != "llama":
        raise SettingError(f"{searched} need AWQ's search, which takes a Llama-family decoder, not the "
                           f"{adapter_for(model).name} family; use ('int8', 'bf16', 'rtn')")
    if searched:
        check_group_size(model, group_size)
    if "int4" in formats:
        _check_int4_shapes(model, group_size)
    if "rtn" in formats:
        _check_columns(model, group_size)
    if "int8" in formats:
        _check_int8_shapes(model)


def int4(model: nn.Module, calib: torch.Tensor | None, *, group_size: int = 64) -> nn.Module:
    """INT4 on the CPU kernel (``lowbit.Int4Linear``), in place: AWQ's grid from ``calib``, or with
    ``calib=None`` round-to-nearest's (no search: for speed measurements, where the grid does not matter).

    The LM head goes to INT8 (decoding reads it whole for every token; INT4 there would cost
    quality the AWQ figure does not include), tied input embeddings read its rows, and the rest
    of the model goes to bf16.
    """
    if calib is not None:
        awq_int4(model, calib, group_size=group_size)
        return awq_to_cpu_int4(model)
    _check_unquantized(model)
    _check_int4_shapes(model, group_size)
    for name, linear in _block_linears(model):
        grid = quantize_groups(linear.weight.detach().float(), group_size=group_size)
        model.set_submodule(name, lowbit.Int4Linear.from_grid(*grid, bias=linear.bias))
    return _finish(model, "int4", group_size=group_size, search="rtn")


def awq_to_cpu_int4(model: nn.Module) -> nn.Module:
    """An ``awq_int4`` model (or one ``load_awq`` read) moved to the CPU int4 kernel, in place.

    autoawq's packing is unpacked to the very integers, zero points and scales it stores, so the
    two models share one grid and differ only in arithmetic (fp16 dequantisation against the
    kernel's bf16).
    """
    from awq.modules.linear import WQLinear_GEMM
    from awq.utils.packing_utils import reverse_awq_order, unpack_awq

    config = getattr(model.config, "quantization_config", None) or {}
    if config.get("quant_method") != "awq":
        raise SettingError("model is not AWQ-quantized: run awq_int4 (or load_awq) first")
    packed = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, WQLinear_GEMM)]
    for name, layer in packed:
        lowbit.check_int4_shape(name, layer.in_features, layer.out_features, config["group_size"])
    _check_int8_head(model)
    for name, layer in packed:
        levels, zeros = reverse_awq_order(*unpack_awq(layer.qweight, layer.qzeros, 4), 4)
        model.set_submodule(name, lowbit.Int4Linear.from_grid(
            (levels & 15).t(), layer.scales.float().t(), (zeros & 15).t(), layer.bias))
    return _finish(model, "int4", group_size=config["group_size"], search="awq")


def int8(model: nn.Module) -> nn.Module:
    """Weight-only INT8 (one scale per output row) on every block linear and the LM head, bf16 elsewhere; in place."""
    _check_unquantized(model)
    _check_int8_shapes(model)
    for name, linear in _block_linears(model):
        model.set_submodule(name, lowbit.Int8Linear.from_linear(linear))
    return _finish(model, "int8")


def bf16(model: nn.Module) -> nn.Module:
    """The whole model in bf16, in place: half the bytes of fp32, and bf16 matmuls where the CPU has them."""
    _check_unquantized(model)
    return lowbit.mark(model.to(torch.bfloat16), "bf16").eval()
