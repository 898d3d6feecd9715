"""Low-bit linear layers that run on PyTorch's own CPU kernels, and their checkpoints.

``Int4Linear``: weight-only INT4 on ``aten._weight_int4pack_mm_for_cpu``, the kernel behind
torchao 0.18's CPU int4 path (``Int4OpaqueTensor``, configured by
``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig``). The layer is ours rather
than torchao's tensor subclass for two reasons: it takes its integers and scales from a grid
chosen elsewhere (AWQ's), where torchao would pick its own from the weights' min and max; and it
saves as plain tensors in safetensors, where the kernel's packed layout depends on the CPU
(PyTorch packs for AVX-512 in blocks of 64 output rows, for AVX2 in blocks of 32), so a packed
checkpoint written on one machine would be garbage on another.

``Int8Linear``: weight-only INT8, one symmetric scale per output row, on
``aten._weight_int8pack_mm``.

Both compute in bf16: on a CPU the two kernels are fast only for bf16 activations (a 1536 x 576
decode step on a 2-core AVX512-BF16 EPYC: fp32 dense 0.066 ms, int4 with bf16 activations
0.027 ms, int4 with fp32 activations 0.87 ms: ``benchmarks/speed.py --kernels``), so a model
that carries them runs in bf16 throughout.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .errors import SettingError
from .paths import staged_directory

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the CPU int4 kernel implements
INT4_ROW_MULTIPLE = 16  # the kernel tiles output rows in blocks of 16, 32, 48 or 64
INT8_COLUMN_MULTIPLE = 16  # torch 2.13's CPU int8 kernel reads input columns 16 at a time: other widths
# give wrong sums or crash the process (input width 24: wrong; 40: segmentation fault)
COMPUTE_DTYPE = torch.bfloat16
QUANT_METHOD = "course_lib"


def check_int4_shape(name: str, in_features: int, out_features: int, group_size: int) -> None:
    """Raise ``ValueError`` naming the layer when the CPU int4 kernel cannot take its shape."""
    if group_size not in INT4_GROUP_SIZES:
        raise SettingError(f"group_size={group_size} is not one the CPU int4 kernel implements; allowed: "
                           f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        raise SettingError(f"group_size={group_size} does not divide the input width {in_features} of {name}; prune "
                           f"to multiples of {group_size} (selection's quant_group_size)")
    if out_features % INT4_ROW_MULTIPLE:
        raise SettingError(f"the output width {out_features} of {name} is not a multiple of {INT4_ROW_MULTIPLE}, "
                           "which the CPU int4 kernel needs")


def check_int8_shape(name: str, in_features: int) -> None:
    """Raise ``ValueError`` naming the layer when the CPU int8 kernel cannot take its input width."""
    if in_features % INT8_COLUMN_MULTIPLE:
        raise SettingError(f"the input width {in_features} of {name} is not a multiple of {INT8_COLUMN_MULTIPLE}, which "
                           f"the CPU int8 kernel needs; prune to multiples of {INT8_COLUMN_MULTIPLE}")


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of a uint8 tensor, low nibble first, flattened."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)


@functools.lru_cache(maxsize=None)
def _kernel_order(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of the kernel's packed [rows, cols] layout, the flat index it came from.

    Found by asking the packer: pack the hexadecimal digits of every position's index, one digit
    per probe, and read back where each digit landed. This follows whatever layout this CPU's
    build of PyTorch uses without copying its tiling rules here.
    """
    index = torch.arange(rows * cols, dtype=torch.int64)
    order = torch.zeros_like(index)
    for digit in range(max(1, ((rows * cols - 1).bit_length() + 3) // 4)):
        probe = ((index >> (4 * digit)) & 15).to(torch.int32).reshape(rows, cols)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        order |= _nibbles(packed).to(torch.int64) << (4 * digit)
    return order


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with ``W[r, c] = (q[r, c] - 8) * scale[g, r] + offset[g, r]``, g = c // group_size.

    ``q`` are 4-bit integers in the kernel's packed layout (``qweight``); ``scales_and_zeros``
    holds ``(scale, offset)`` per group and row in bf16, the form the kernel reads. A grid with an
    integer zero point z, ``W = (q - z) * scale``, is the same weight with ``offset = (8 - z) * scale``.
    The state dict is plain (``qweight`` two values per byte, row-major, low nibble first), so a
    checkpoint loads on any CPU.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        check_int4_shape("Int4Linear", in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                             dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE_DTYPE) if bias else None)

    @classmethod
    def from_grid(cls, levels: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bias: torch.Tensor | None = None) -> Int4Linear:
        """From integer ``levels`` [out, in] in 0..15, with ``scales`` and integer ``zeros`` [out, in / group]."""
        out_features, in_features = levels.shape
        layer = cls(in_features, out_features, in_features // scales.shape[1], bias is not None)
        layer._pack(levels)
        offsets = (8 - zeros.float()) * scales.float()
        layer.scales_and_zeros.copy_(torch.stack([scales.float().t(), offsets.t()], dim=-1))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def _pack(self, levels: torch.Tensor) -> None:
        self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).contiguous(), 1)

    def levels(self) -> torch.Tensor:
        """The integers [out, in], unpacked from the kernel's layout."""
        flat = torch.empty(self.out_features * self.in_features, dtype=torch.uint8)
        flat[_kernel_order(self.out_features, self.in_features)] = _nibbles(self.qweight)
        return flat.reshape(self.out_features, self.in_features)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``from_grid``'s arguments back: ``(levels, scales, zeros)``, scales in fp32 (as stored, bf16-rounded)
        and the integer zero points recovered from the stored offsets, ``zero = 8 - offset / scale``."""
        scale_offset = self.scales_and_zeros.float()  # [groups, out, (scale, offset)]
        scales = scale_offset[..., 0].t()
        return self.levels(), scales, torch.round(8 - scale_offset[..., 1].t() / scales).clamp(0, 15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        levels = self.levels().reshape(self.out_features, -1, 2)
        destination[prefix + "qweight"] = levels[..., 0] | (levels[..., 1] << 4)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        plain = state_dict.get(prefix + "qweight")
        if plain is not None:
            if plain.shape != (self.out_features, self.in_features // 2):
                error_msgs.append(f"{prefix}qweight: shape {tuple(plain.shape)}, expected "
                                  f"{(self.out_features, self.in_features // 2)}")
                return
            state_dict = {**state_dict, prefix + "qweight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                _nibbles(plain).reshape(self.out_features, self.in_features).to(torch.int32), 1)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(nn.Module):
    """``y = x (q * scale)^T + b``: int8 weights ``qweight`` [out, in], one bf16 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        check_int8_shape("Int8Linear", in_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=COMPUTE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=COMPUTE_DTYPE) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Round each row of ``linear.weight`` symmetrically to -127..127 times its largest magnitude / 127."""
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.qweight.copy_(torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8TiedEmbedding(nn.Module):
    """Input embeddings read from an ``Int8Linear`` LM head's rows: a tied table stays one tensor.

    The head is held outside the module tree, so its tensors are saved once, under the head.
    """

    def __init__(self, head: Int8Linear):
        super().__init__()
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.qweight[ids].to(COMPUTE_DTYPE) * self.head.scales[ids, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to the INT8 LM head"


LAYERS = {"int4": Int4Linear, "int8": Int8Linear}


def layer_map(model: nn.Module) -> dict[str, dict]:
    """Every low-bit layer of ``model`` by module name: its kind and constructor arguments, what a loader rebuilds."""
    found = {}
    for name, module in model.named_modules():
        for kind, cls in LAYERS.items():
            if isinstance(module, cls):
                shape = {"in_features": module.in_features, "out_features": module.out_features,
                         "bias": module.bias is not None}
                found[name] = {"kind": kind, **shape, **({"group_size": module.group_size} if kind == "int4" else {})}
    return found


def mark(model: nn.Module, scheme: str, **details) -> nn.Module:
    """Record in ``model.config`` what ``save`` writes and ``load`` rebuilds; surgery refuses the model after this."""
    model.config.quantization_config = {"quant_method": QUANT_METHOD, "scheme": scheme,
                                        "compute_dtype": "bfloat16", **details}
    return model


def save(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write a model quantized by ``course_lib.quantize.int4`` / ``int8`` / ``bf16`` as safetensors, all or nothing."""
    quant = dict(getattr(model.config, "quantization_config", None) or {})
    if quant.get("quant_method") != QUANT_METHOD:
        raise SettingError(f"model is not quantized by course_lib.quantize's int4, int8 or bf16 (quantization_config: "
                           f"{quant or None}); AWQ checkpoints go through save_awq, and RTN is simulated in fp32: "
                           "save the fp32 model with save_pretrained")
    directory = Path(directory)
    model.config.quantization_config = quant | {"layers": layer_map(model)}
    try:
        with staged_directory(directory) as staged:
            model.save_pretrained(staged)
            if tokenizer is not None:
                tokenizer.save_pretrained(staged)
    finally:
        model.config.quantization_config = quant
    return directory


def load(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by ``save`` on any CPU; returns the model in eval mode, in bf16.

    The model is built from its config (pruned widths included), its low-bit layers put back by
    name and shape from ``quantization_config["layers"]``, and the tensors loaded strictly:
    anything missing or left over is an error. The int4 weights are packed for this CPU here.
    """
    def rebuild(model: nn.Module, quant: dict) -> None:
        model.to(COMPUTE_DTYPE)
        for name, spec in quant["layers"].items():
            arguments = {key: value for key, value in spec.items() if key != "kind"}
            model.set_submodule(name, LAYERS[spec["kind"]](**arguments))
        if quant.get("tied_embeddings"):
            model.set_input_embeddings(Int8TiedEmbedding(model.get_output_embeddings()))

    model = build_from_checkpoint(directory, QUANT_METHOD, rebuild)
    model.config.quantization_config = {k: v for k, v in model.config.quantization_config.items() if k != "layers"}
    return model



def build_from_checkpoint(directory: str | Path, quant_method: str, rebuild) -> nn.Module:
    """The model a quantized checkpoint describes, in eval mode.

    transformers loads quantized checkpoints only through its own quantizer back ends (for AWQ,
    gptqmodel, which is not part of this stack), so: build the model from its config (pruned
    widths included), let ``rebuild(model, quantization_config)`` put the quantized layers in
    place, and load the tensors strictly: anything missing or left over is an error.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .pruned_modeling import auto_class_for

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    quant = getattr(config, "quantization_config", None) or {}
    if quant.get("quant_method") != quant_method:
        raise SettingError(f"{directory} is not a checkpoint of quant_method={quant_method!r} "
                           f"(quantization_config: {quant or None})")
    del config.quantization_config  # else transformers would look for a quantizer back end
    model = auto_class_for(config).from_config(config)
    rebuild(model, quant)
    state = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SettingError(f"{directory} does not match its config: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if tied and not quant.get("tied_embeddings"):
        model.tie_weights()
    model.config.quantization_config = quant
    return model.eval()
