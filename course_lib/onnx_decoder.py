"""A Llama-family decoder, fp32 or INT4, decoding on ONNX Runtime's CPU kernels.

Why it exists: PyTorch's CPU int4 kernel (``lowbit.Int4Linear``) widens every weight to bf16 and
multiplies in bf16. On a CPU without fast bf16 (no AVX512-BF16 or AMX; the Intel Xeon of the
course's CI is one) that kernel is bound by arithmetic, not memory: it reads 6-8x fewer bytes
than fp32 and runs only ~2x faster, and a decode step of the INT4 SmolLM2 stays at ~1.6x the fp32
model's. ONNX Runtime's ``MatMulNBits`` with ``accuracy_level=4`` rounds each block of the
activations to int8 and multiplies int4 by int8 with integer dot products (AVX512-VNNI / AVX-VNNI
on x86, the way llama.cpp's Q4 kernels work), so the step is bound by reading the weights again.

The graph is written here node by node from the model's modules, not traced: per block an RMSNorm
(``SimplifiedLayerNormalization``), the q/k/v projections, ``GroupQueryAttention`` (rotary
embedding and the KV cache inside the op), the o projection and residual, an RMSNorm, gate and up,
SiLU(gate) * up, down and residual; then the final norm and the LM head. Each block keeps its own
head counts and widths, so a non-uniformly pruned model builds as it is. ``LINEARS`` maps each
module type to its ONNX form: ``nn.Linear`` (fp32 ``MatMul``), ``Int4Linear`` (4-bit
``MatMulNBits`` on the very integers, scales and zero points) and ``Int8Linear`` (8-bit
``MatMulNBits``, the INT8 LM head of ``quantize.int4``).

The session is built in memory from the model (about a second for SmolLM2) and nothing else is
written: checkpoints stay safetensors (``lowbit.save``); load one and wrap it again.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import lowbit
from .errors import SettingError
from .pruned_modeling import adapter_for

OPSETS = {"": 17, "com.microsoft": 1}
INT8_ACTIVATIONS = 4  # MatMulNBits' accuracy_level: int8 activation blocks, integer dot products
FLOAT_ACTIVATIONS = 0  # fp32 activations (each weight widened to fp32): the reference arithmetic
MAX_POSITIONS = 4096  # rows of the rotary cos/sin tables the graph carries (prompt + generated tokens)


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:  # both are in requirements.txt; a trimmed environment may lack them
        raise SettingError("onnx_decoder needs the onnx and onnxruntime packages (requirements.txt pins both)") from error
    return onnx, onnxruntime


class _Graph:
    """Nodes and weights (initializers) of the graph being written; callers name every value."""

    def __init__(self, onnx):
        self.onnx, self.helper, self.numpy_helper = onnx, onnx.helper, onnx.numpy_helper
        self.nodes, self.weights = [], []

    def weight(self, name: str, array) -> str:
        array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        self.weights.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attributes) -> str:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(self.helper.make_node(op, inputs, outputs, domain=domain, **attributes))
        return outputs[0]


def _nibble_pairs(values: torch.Tensor) -> torch.Tensor:
    """uint8 bytes of 4-bit values two per byte along the last dim, the first in the low nibble (MatMulNBits' order)."""
    values = values.to(torch.int32)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).to(torch.uint8)


def _block_size(in_features: int) -> int:
    """The largest power of two <= 256 that divides ``in_features`` (MatMulNBits takes blocks of 16 .. 256)."""
    size = 256
    while size >= 16 and in_features % size:
        size //= 2
    if size < 16:
        raise SettingError(f"input width {in_features} is not a multiple of 16, which MatMulNBits needs")
    return size


def _fp32_linear(g: _Graph, x: str, layer: nn.Linear, name: str, activations: int) -> str:
    y = g.node("MatMul", [x, g.weight(name + ".weight", layer.weight.detach().float().t())], name + ".matmul")
    return y if layer.bias is None else g.node("Add", [y, g.weight(name + ".bias", layer.bias.float())], name)


def _nbits(g: _Graph, x: str, name: str, levels: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           bits: int, bias, activations: int) -> str:
    """``MatMulNBits`` on integer ``levels`` [out, in] with ``scales`` and integer ``zeros`` [out, in / block]:
    ``W = (levels - zeros) * scales`` per block of input columns."""
    out_features, in_features = levels.shape
    blocks = scales.shape[1]
    block = in_features // blocks
    if bits == 4:
        weight = _nibble_pairs(levels).reshape(out_features, blocks, block // 2)
        padded = torch.zeros(out_features, blocks + blocks % 2, dtype=torch.int32)
        padded[:, :blocks] = zeros.to(torch.int32)
        zero_points = _nibble_pairs(padded).reshape(-1)
    else:
        weight = levels.to(torch.uint8).reshape(out_features, blocks, block)
        zero_points = zeros.to(torch.uint8).reshape(-1)
    inputs = [x, g.weight(name + ".qweight", weight), g.weight(name + ".scales", scales.float().reshape(-1)),
              g.weight(name + ".zeros", zero_points)]
    y = g.node("MatMulNBits", inputs, name + ".matmul", domain="com.microsoft", K=in_features, N=out_features,
               bits=bits, block_size=block, accuracy_level=activations)
    return y if bias is None else g.node("Add", [y, g.weight(name + ".bias", bias.float())], name)


def _int4_linear(g: _Graph, x: str, layer: lowbit.Int4Linear, name: str, activations: int) -> str:
    # lowbit.INT4_GROUP_SIZES (32 .. 256, powers of two) are all block sizes MatMulNBits takes
    return _nbits(g, x, name, *layer.grid(), 4, layer.bias, activations)


def _int8_linear(g: _Graph, x: str, layer: lowbit.Int8Linear, name: str, activations: int) -> str:
    blocks = layer.in_features // _block_size(layer.in_features)
    scales = layer.scales.float()[:, None].expand(-1, blocks)
    levels = layer.qweight.to(torch.int32) + 128  # symmetric int8 as uint8 around the zero point 128
    return _nbits(g, x, name, levels, scales, torch.full_like(scales, 128), 8, layer.bias, activations)


LINEARS = {nn.Linear: _fp32_linear, lowbit.Int4Linear: _int4_linear, lowbit.Int8Linear: _int8_linear}


def _linear(g: _Graph, x: str, layer: nn.Module, name: str, activations: int) -> str:
    writer = LINEARS.get(type(layer))
    if writer is None:
        raise SettingError(f"{name} is a {type(layer).__name__}; onnx_decoder writes "
                           f"{', '.join(t.__name__ for t in LINEARS)}")
    return writer(g, x, layer, name, activations)


def _embedding(g: _Graph, embedding: nn.Module) -> str:
    if isinstance(embedding, lowbit.Int8TiedEmbedding):
        rows = g.node("Cast", [g.node("Gather", [g.weight("embed.qweight", embedding.head.qweight), "input_ids"],
                                      "embed.rows")], "embed.float", to=g.onnx.TensorProto.FLOAT)
        scales = g.node("Unsqueeze", [g.node("Gather", [g.weight("embed.scales", embedding.head.scales.float()),
                                                        "input_ids"], "embed.row_scales"),
                                      g.weight("embed.last_axis", np.array([-1], dtype=np.int64))], "embed.scale")
        return g.node("Mul", [rows, scales], "embed")
    if isinstance(embedding, nn.Embedding):
        return g.node("Gather", [g.weight("embed.weight", embedding.weight.float()), "input_ids"], "embed")
    raise SettingError(f"the input embedding is a {type(embedding).__name__}; onnx_decoder writes nn.Embedding and "
                       "lowbit.Int8TiedEmbedding")


def _rms_norm(g: _Graph, x: str, norm: nn.Module, name: str) -> str:
    return g.node("SimplifiedLayerNormalization", [x, g.weight(name + ".weight", norm.weight.float())], name,
                  axis=-1, epsilon=float(norm.variance_epsilon), stash_type=1)


def unsupported(model: nn.Module) -> str | None:
    """Why ``build`` cannot write ``model`` (a sentence), or None when it can."""
    config, family = model.config, adapter_for(model).name
    if family != "llama":
        return f"onnx_decoder writes Llama-family decoders (Llama, SmolLM2, Mistral), not the {family} family"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"onnx_decoder writes the default rotary embedding, not rope_type={rope['rope_type']!r}"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return "onnx_decoder writes a SiLU-gated MLP without biases"
    if getattr(config, "sliding_window", None):
        return "onnx_decoder does not write sliding-window attention"
    if lowbit.COMPUTE_DTYPE in {p.dtype for p in model.parameters()} and not lowbit.layer_map(model):
        return "onnx_decoder writes fp32 models and quantize.int4 / quantize.int8 ones, not a bf16 cast"
    return None


def build(model: nn.Module, activations: int = INT8_ACTIVATIONS):
    """The ONNX graph (an ``onnx.ModelProto``) of ``model``, a Llama-family causal LM in fp32 or from ``quantize.int4``.

    Inputs: ``input_ids`` [batch, seq], ``seqlens_k`` [batch] (tokens so far - 1), ``total_sequence_length``,
    and ``past_key.i`` / ``past_value.i`` [batch, kv heads, past, head_dim] per block; outputs: ``logits`` and
    ``present_key.i`` / ``present_value.i``. ``activations``: ``INT8_ACTIVATIONS`` or ``FLOAT_ACTIVATIONS``
    for the low-bit layers (fp32 layers compute in fp32 either way).
    """
    onnx, _ = _onnx()
    if activations not in (INT8_ACTIVATIONS, FLOAT_ACTIVATIONS):
        raise SettingError(f"activations must be INT8_ACTIVATIONS ({INT8_ACTIVATIONS}) or FLOAT_ACTIVATIONS "
                           f"({FLOAT_ACTIVATIONS}), got {activations!r}")
    reason = unsupported(model)
    if reason:
        raise SettingError(reason)
    config, adapter, g = model.config, adapter_for(model), _Graph(onnx)
    float32, head_dim = onnx.TensorProto.FLOAT, adapter.head_dim(model)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    angles = np.arange(MAX_POSITIONS)[:, None] / theta ** (np.arange(0, head_dim, 2) / head_dim)[None]
    cos = g.weight("rotary.cos", np.cos(angles).astype(np.float32))
    sin = g.weight("rotary.sin", np.sin(angles).astype(np.float32))
    value = onnx.helper.make_tensor_value_info
    inputs = [value("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]),
              value("seqlens_k", onnx.TensorProto.INT32, ["batch"]),
              value("total_sequence_length", onnx.TensorProto.INT32, [])]
    outputs = [value("logits", float32, ["batch", "seq", config.vocab_size])]
    h = _embedding(g, model.get_input_embeddings())
    for i, block in enumerate(adapter.blocks(model)):
        p, heads, kv_heads = f"layers.{i}", adapter.num_heads(block), adapter.num_kv_heads(block)
        cache = [f"past_key.{i}", f"past_value.{i}"]
        inputs += [value(name, float32, ["batch", kv_heads, "past", head_dim]) for name in cache]
        outputs += [value(f"present_{kind}.{i}", float32, ["batch", kv_heads, "total", head_dim])
                    for kind in ("key", "value")]
        x = _rms_norm(g, h, block.input_layernorm, p + ".input_layernorm")
        qkv = [_linear(g, x, proj, f"{p}.{name}", activations) for name, proj in zip("qkv", adapter.qkv(block))]
        attention = g.node("GroupQueryAttention", [*qkv, *cache, "seqlens_k", "total_sequence_length", cos, sin],
                           [p + ".attention", f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft",
                           num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                           scale=float(block.self_attn.scaling))
        o = _linear(g, attention, adapter.o_proj(block), p + ".o", activations)
        h = g.node("Add", [h, o], p + ".attention_out")
        x = _rms_norm(g, h, block.post_attention_layernorm, p + ".post_attention_layernorm")
        gate, up = (_linear(g, x, proj, f"{p}.{name}", activations)
                    for name, proj in zip(("gate", "up"), adapter.mlp_in(block)))
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], p + ".sigmoid")], p + ".silu")
        down = _linear(g, g.node("Mul", [silu, up], p + ".gated"), adapter.mlp_out(block), p + ".down", activations)
        h = g.node("Add", [h, down], p + ".out")
    h = _rms_norm(g, h, model.model.norm, "norm")
    _linear(g, h, model.get_output_embeddings(), "lm_head", activations)
    g.nodes[-1].output[0] = "logits"  # the head's last node (its MatMul, or the Add of a bias) is the graph's output
    graph = onnx.helper.make_graph(g.nodes, "decoder", inputs, outputs, g.weights)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in OPSETS.items()])


class OrtDecoder(nn.Module):
    """``model`` served by an ONNX Runtime session, with the call signature the course's evaluation and timing use.

    ``OrtDecoder(model)(ids)`` gives ``.logits`` like the model; with ``use_cache=True`` it also gives
    ``.past_key_values`` (the session's present keys and values) to pass back with the next tokens.
    Batches have no padding (every row as long as the others). The wrapped model stays a submodule,
    so parameter counts, weight bytes and its config read as the model's; its weights are copied into
    the session when this is built, so changing them afterwards does not change what runs.
    """

    def __init__(self, model: nn.Module, activations: int = INT8_ACTIVATIONS, threads: int | None = None):
        super().__init__()
        _, onnxruntime = _onnx()
        graph = build(model, activations)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle threads sleep instead of spinning: spinning would take the cores from whatever runs next
        # (a PyTorch model timed side by side), and timing must not favour either.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        self.model, self.config, self.activations = model, model.config, activations
        adapter = adapter_for(model)
        self.cache_heads = [adapter.num_kv_heads(block) for block in adapter.blocks(model)]
        self.head_dim = adapter.head_dim(model)

    def can_generate(self) -> bool:
        return True

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, self.head_dim), np.float32) for heads in self.cache_heads for _ in "kv"]

    def forward(self, input_ids: torch.Tensor, past_key_values: list[np.ndarray] | None = None,
                use_cache: bool = False, attention_mask: torch.Tensor | None = None, **unused) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise SettingError("OrtDecoder takes batches without padding: attention_mask must be all ones")
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        batch, seq = ids.shape
        cache = past_key_values if past_key_values is not None else self._empty_cache(batch)
        if batch > 1 and seq > 1 and cache[0].shape[2]:  # GroupQueryAttention takes this only one row at a time
            rows = [self.forward(input_ids[r:r + 1], [c[r:r + 1] for c in cache], True) for r in range(batch)]
            present = [np.concatenate(parts) for parts in zip(*(row.past_key_values for row in rows))]
            return CausalLMOutputWithPast(logits=torch.cat([row.logits for row in rows]),
                                          past_key_values=present if use_cache else None)
        total = cache[0].shape[2] + seq
        if total > MAX_POSITIONS:
            raise SettingError(f"OrtDecoder holds rotary positions for {MAX_POSITIONS} tokens; got {total}")
        feed = {"input_ids": ids, "seqlens_k": np.full(batch, total - 1, np.int32),
                "total_sequence_length": np.array(total, np.int32)}
        for i in range(len(self.cache_heads)):
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = cache[2 * i], cache[2 * i + 1]
        logits, *present = self.session.run(None, feed)
        return CausalLMOutputWithPast(logits=torch.from_numpy(logits), past_key_values=present if use_cache else None)

    def extra_repr(self) -> str:
        kind = "int8 activations" if self.activations == INT8_ACTIVATIONS else "fp32 activations"
        return f"onnxruntime CPU session, {len(self.cache_heads)} blocks, {kind} in the low-bit layers"
