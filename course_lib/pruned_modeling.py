"""Family adapters and pruned model classes whose per-layer shapes survive save and reload.

This file imports only ``torch`` and ``transformers`` on purpose: ``save_pretrained`` copies it
beside the weights of a pruned model, so that ``AutoModel*.from_pretrained(dir,
trust_remote_code=True)`` rebuilds the pruned shapes for a user who has only transformers
installed. With ``course_lib`` imported, the ``pruned_*`` model types are registered with the
Auto classes and no remote code is needed.

Why it exists: transformers 5 has no ``prune_heads`` and no ``pruned_heads``, and a stock config
holds one head count and one FFN width for every layer. A pruned model records its shapes in
``config.layer_shapes`` (one ``{"num_attention_heads", "num_key_value_heads",
"intermediate_size"}`` dict per layer) under a ``pruned_<family>`` model type; its class builds
the stock model and then narrows each layer to those shapes.

One adapter per architecture family gives uniform access to a block's attention projections,
heads, KV groups and MLP. Importance, selection and surgery talk to adapters, never to
``model.encoder.layer`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    Qwen3Model,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` keeping ``index`` along ``dim`` (0 = output rows, 1 = input columns).

    Works on real and on meta tensors, so loading a pruned checkpoint reuses this exact code to
    narrow freshly built (meta) layers before the weights arrive.
    """
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device))
    out_features, in_features = weight.shape
    # Built on meta, then given the sliced tensors: a real-device nn.Linear would first fill a
    # throwaway random weight (slow, and it advances torch's global RNG); index_select already copies.
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def add_bias(linear: nn.Linear) -> None:
    """Give a bias-free ``nn.Linear`` a zero bias (on its weight's device, meta included)."""
    w = linear.weight
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=w.dtype, device=w.device),
                               requires_grad=w.requires_grad)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the projection rows that belong to ``heads`` (in the given order)."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@dataclass(frozen=True)
class Cut:
    """One projection a structure owns a slice of: ``path`` inside the block, along ``dim``.

    ``dim=0`` takes output rows (and their bias entries); ``dim=1`` takes input columns, and that
    projection is the structure's *consumer* (the one reconstruction refits).
    """

    path: str
    dim: int


@dataclass(frozen=True)
class Structure:
    """A removable unit: the slices it owns, each ``width`` indices wide (``"head"``: head_dim; ``1``)."""

    cuts: tuple[Cut, ...]
    width: str | int = 1

    def inputs(self) -> tuple[Cut, ...]:
        return tuple(c for c in self.cuts if c.dim == 0)

    def consumer(self) -> Cut | None:
        return next((c for c in self.cuts if c.dim == 1), None)


def _get(root: nn.Module, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _set(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


@dataclass(frozen=True)
class FamilyAdapter:
    """One architecture family, described as data: where its blocks are and what each structure owns.

    ``query_head``, ``kv_head`` and ``neuron`` list the coupled slices (parameter, dimension, index
    rule) of one unit; surgery, parameter counts (``unit_parameters``), weight scores and
    reconstruction all read them from here. ``head_counts`` names the attention attributes that
    follow a change of head counts, as functions of ``(n_q, n_kv, head_dim)``; ``neuron_count``
    the MLP attribute that follows a change of width, if any. Supporting a new family is one more
    instance of this class.
    """

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    attention_path: str
    head_dim_attr: str
    query_head: Structure
    kv_head: Structure
    neuron: Structure
    mlp_path: str
    act_path: str
    head_counts: tuple[tuple[str, Callable[[int, int, int], int]], ...]
    neuron_count: str | None = None
    pin_head_dim_in_config: bool = False
    gated_mlp: bool = False

    # ---- structure -------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def attention(self, block: nn.Module) -> nn.Module:
        """The module that owns the q/k/v projections and the per-head attributes."""
        return _get(block, self.attention_path)

    def qkv(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        (q,), (k, v) = self.query_head.inputs(), self.kv_head.inputs()
        return _get(block, q.path), _get(block, k.path), _get(block, v.path)

    def o_proj(self, block: nn.Module) -> nn.Linear:
        """The projection whose input columns are the concatenated head outputs."""
        return _get(block, self.query_head.consumer().path)

    def mlp_in(self, block: nn.Module) -> list[nn.Linear]:
        """Projections whose output rows are the intermediate neurons (gate first if gated)."""
        return [_get(block, c.path) for c in self.neuron.inputs()]

    def mlp_out(self, block: nn.Module) -> nn.Linear:
        return _get(block, self.neuron.consumer().path)

    def mlp_act(self, block: nn.Module) -> nn.Module:
        return _get(block, self.act_path)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        """The module whose forward input is the block's MLP input (for hooks)."""
        return _get(block, self.mlp_path)

    def pin_head_dim(self, model: nn.Module) -> None:
        """Record the head size in the config where the family would otherwise re-derive it.

        Llama's rotary embeddings and attention read ``config.head_dim``, else ``hidden_size //
        num_attention_heads``; BERT derives it from the unpruned head count the config keeps.
        """
        if self.pin_head_dim_in_config:
            model.config.head_dim = self.head_dim(model)

    # ---- per-layer shapes --------------------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        return self._head_dim(self.attention(self.blocks(model)[0]))

    def _head_dim(self, attention: nn.Module) -> int:
        return getattr(attention, self.head_dim_attr)

    def num_heads(self, block: nn.Module) -> int:
        q, _, _ = self.qkv(block)
        return q.out_features // self._head_dim(self.attention(block))

    def num_kv_heads(self, block: nn.Module) -> int:
        _, k, _ = self.qkv(block)
        return k.out_features // self._head_dim(self.attention(block))

    def intermediate_size(self, block: nn.Module) -> int:
        return self.mlp_out(block).in_features

    def unit_parameters(self, block: nn.Module, kind: str) -> int:
        """Parameters one ``kind`` unit (``"query_head"``, ``"kv_head"``, ``"neuron"``) owns in ``block``.

        A row slice owns the row and its bias entry; a column slice owns the column (the
        consumer's bias belongs to no unit).
        """
        structure = getattr(self, kind)
        width = self._head_dim(self.attention(block)) if structure.width == "head" else structure.width
        per_index = 0
        for cut in structure.cuts:
            linear = _get(block, cut.path)
            per_index += linear.in_features + (linear.bias is not None) if cut.dim == 0 else linear.out_features
        return width * per_index

    def layer_shape(self, block: nn.Module) -> dict[str, int | bool]:
        """Everything ``narrow_to`` needs to rebuild the block: widths, and which consumers have a bias.

        Reconstruction (``course_lib.reconstruction``) may give ``o_proj`` / ``down_proj`` a bias
        that a stock Llama block does not have; the flags make ``from_pretrained`` create it.
        """
        return {
            "num_attention_heads": self.num_heads(block),
            "num_key_value_heads": self.num_kv_heads(block),
            "intermediate_size": self.intermediate_size(block),
            "o_bias": self.o_proj(block).bias is not None,
            "mlp_out_bias": self.mlp_out(block).bias is not None,
        }

    # ---- narrowing (the only code that changes shapes) ---------------------------------------
    def _keep(self, block: nn.Module, structure: Structure, index: torch.Tensor) -> None:
        for cut in structure.cuts:
            _set(block, cut.path, slice_linear(_get(block, cut.path), index, cut.dim))

    def keep_heads(self, block: nn.Module, q_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
        """Keep the listed query heads and KV heads of ``block``; the caller checks feasibility."""
        attention = self.attention(block)
        head_dim = self._head_dim(attention)
        self._keep(block, self.query_head, head_rows(q_heads, head_dim))
        self._keep(block, self.kv_head, head_rows(kv_heads, head_dim))
        for attr, rule in self.head_counts:
            setattr(attention, attr, rule(len(q_heads), len(kv_heads), head_dim))

    def keep_neurons(self, block: nn.Module, neurons: torch.Tensor) -> None:
        neurons = torch.as_tensor(neurons, dtype=torch.long)
        self._keep(block, self.neuron, neurons)
        if self.neuron_count:
            _set(block, self.neuron_count, len(neurons))

    def narrow_to(self, block: nn.Module, shape: dict[str, int]) -> None:
        """Give ``block`` the recorded shape by keeping the first heads and neurons.

        Used when a pruned checkpoint is loaded: the stock model is built (on the meta device
        inside ``from_pretrained``), narrowed here, and only then are the weights filled in.
        """
        self.keep_heads(block, torch.arange(shape["num_attention_heads"]), torch.arange(shape["num_key_value_heads"]))
        self.keep_neurons(block, torch.arange(shape["intermediate_size"]))
        for key, linear in (("o_bias", self.o_proj(block)), ("mlp_out_bias", self.mlp_out(block))):
            if shape.get(key) and linear.bias is None:  # older checkpoints have no flag: no bias
                add_bias(linear)

    # ---- layers ------------------------------------------------------------------------------
    def keep_layers(self, model: nn.Module, layers: list[int]) -> None:
        """Keep the listed blocks, re-index them, and shorten every per-layer config list."""
        blocks = self.blocks(model)
        kept = nn.ModuleList([blocks[i] for i in layers])
        _set(model, self.blocks_path, kept)
        for new_idx, block in enumerate(kept):
            # layer_idx is the KV-cache slot: stale values make generate() read another layer's cache.
            self.attention(block).layer_idx = new_idx
        config = model.config
        config.num_hidden_layers = len(layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in layers]
        if getattr(config, "layer_shapes", None) is not None:
            config.layer_shapes = [config.layer_shapes[i] for i in layers]


_HEAD = "head"
# BERT, RoBERTa, MiniLM: post-LN encoder blocks, one key/value head per query head.
BertFamily = FamilyAdapter(
    name="bert", model_types=("bert", "roberta"),
    blocks_path="base_model.encoder.layer", attention_path="attention.self", head_dim_attr="attention_head_size",
    query_head=Structure((Cut("attention.self.query", 0), Cut("attention.output.dense", 1)), _HEAD),
    kv_head=Structure((Cut("attention.self.key", 0), Cut("attention.self.value", 0)), _HEAD),
    neuron=Structure((Cut("intermediate.dense", 0), Cut("output.dense", 1))),
    mlp_path="intermediate", act_path="intermediate.intermediate_act_fn",
    head_counts=(("num_attention_heads", lambda n_q, n_kv, d: n_q), ("all_head_size", lambda n_q, n_kv, d: n_q * d)),
)
# Llama, Mistral, Qwen2 (biases on q/k/v), Qwen3, SmolLM2: pre-norm decoders with GQA/MQA/MHA.
# Qwen3's q_norm / k_norm are RMSNorms over one head's head_dim, shared by every head, so they
# own no slice. The attention kernels repeat each KV head num_key_value_groups times.
LlamaFamily = FamilyAdapter(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks_path="base_model.layers", attention_path="self_attn", head_dim_attr="head_dim",
    query_head=Structure((Cut("self_attn.q_proj", 0), Cut("self_attn.o_proj", 1)), _HEAD),
    kv_head=Structure((Cut("self_attn.k_proj", 0), Cut("self_attn.v_proj", 0)), _HEAD),
    neuron=Structure((Cut("mlp.gate_proj", 0), Cut("mlp.up_proj", 0), Cut("mlp.down_proj", 1))),
    mlp_path="mlp", act_path="mlp.act_fn",
    head_counts=(("num_key_value_groups", lambda n_q, n_kv, d: n_q // n_kv),),
    neuron_count="mlp.intermediate_size", pin_head_dim_in_config=True, gated_mlp=True,
)


ADAPTERS: tuple[FamilyAdapter, ...] = (BertFamily, LlamaFamily)


def _base_model_type(config) -> str:
    return getattr(config, "base_model_type", None) or config.model_type


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter of a model's (or config's) family; a clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = _base_model_type(config)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = {a.name: list(a.model_types) for a in ADAPTERS}
    raise ValueError(f"model_type={model_type!r} is not supported; supported families: {supported}")


# ---- pruned config and model classes ----------------------------------------------------------
# One entry per stock family member: its config class and the model classes to mirror.
_STOCK = {
    "bert": (BertConfig, {"AutoModel": BertModel, "AutoModelForSequenceClassification": BertForSequenceClassification,
                          "AutoModelForMaskedLM": BertForMaskedLM}),
    "roberta": (RobertaConfig, {"AutoModel": RobertaModel,
                                "AutoModelForSequenceClassification": RobertaForSequenceClassification,
                                "AutoModelForMaskedLM": RobertaForMaskedLM}),
    "llama": (LlamaConfig, {"AutoModel": LlamaModel, "AutoModelForCausalLM": LlamaForCausalLM,
                            "AutoModelForSequenceClassification": LlamaForSequenceClassification}),
    "mistral": (MistralConfig, {"AutoModel": MistralModel, "AutoModelForCausalLM": MistralForCausalLM,
                                "AutoModelForSequenceClassification": MistralForSequenceClassification}),
    "qwen2": (Qwen2Config, {"AutoModel": Qwen2Model, "AutoModelForCausalLM": Qwen2ForCausalLM,
                            "AutoModelForSequenceClassification": Qwen2ForSequenceClassification}),
    "qwen3": (Qwen3Config, {"AutoModel": Qwen3Model, "AutoModelForCausalLM": Qwen3ForCausalLM,
                            "AutoModelForSequenceClassification": Qwen3ForSequenceClassification}),
}
_AUTO = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
         "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
         "AutoModelForMaskedLM": AutoModelForMaskedLM}


def auto_class_for(config):
    """The auto class that builds ``config``'s architecture (``...ForCausalLM`` -> ``AutoModelForCausalLM``)."""
    architecture = (getattr(config, "architectures", None) or [""])[0]
    for name, auto in _AUTO.items():
        if name != "AutoModel" and architecture.endswith(name.removeprefix("AutoModel")):
            return auto
    return AutoModel


PRUNED_CONFIGS: dict[str, type] = {}  # stock model_type -> pruned config class
PRUNED_MODELS: dict[type, type] = {}  # stock model class -> pruned model class


def _make_pruned_classes() -> None:
    module_name = __name__.rsplit(".", 1)[-1]
    for stock_type, (config_cls, models) in _STOCK.items():
        config_name = "Pruned" + config_cls.__name__
        pruned_config = type(config_name, (config_cls,), {"model_type": f"pruned_{stock_type}", "__module__": __name__,
                                                          "base_model_type": stock_type})
        globals()[config_name] = pruned_config
        PRUNED_CONFIGS[stock_type] = pruned_config
        AutoConfig.register(pruned_config.model_type, pruned_config, exist_ok=True)
        auto_map = {"AutoConfig": f"{module_name}.{config_name}"}
        for auto_name, stock_cls in models.items():
            name = "Pruned" + stock_cls.__name__
            cls = type(name, (stock_cls,), {"config_class": pruned_config, "__module__": __name__})
            cls.__init__ = _bind_init(cls)
            globals()[name] = cls
            PRUNED_MODELS[stock_cls] = cls
            _AUTO[auto_name].register(pruned_config, cls, exist_ok=True)
            auto_map[auto_name] = f"{module_name}.{name}"
        pruned_config.default_auto_map = auto_map


def _bind_init(cls):
    def __init__(self, config, *args, **kwargs):
        """Build the stock model, then narrow every layer to ``config.layer_shapes``."""
        super(cls, self).__init__(config, *args, **kwargs)
        shapes = getattr(config, "layer_shapes", None)
        if shapes:
            adapter = adapter_for(config)
            for block, shape in zip(adapter.blocks(self), shapes):
                adapter.narrow_to(block, shape)

    return __init__


_make_pruned_classes()


def mark_pruned(model: nn.Module) -> None:
    """Turn a stock model into its pruned twin in place, recording every layer's shape.

    The classes are swapped in place (model and config alike) because every submodule holds a
    reference to the same config object; afterwards ``model.save_pretrained`` writes the
    ``pruned_*`` config, the per-layer shapes, ``auto_map`` and a copy of this file.
    """
    adapter = adapter_for(model)
    config = model.config
    if type(config).model_type.startswith("pruned_"):
        pruned_cls = type(model)
    else:
        stock_cls = next(c for c in type(model).__mro__ if c in PRUNED_MODELS)
        pruned_cls = PRUNED_MODELS[stock_cls]
        config.__class__ = PRUNED_CONFIGS[config.model_type]
        model.__class__ = pruned_cls
    adapter.pin_head_dim(model)
    config.layer_shapes = [adapter.layer_shape(block) for block in adapter.blocks(model)]
    config.auto_map = dict(type(config).default_auto_map)
    # save_pretrained copies this file beside the weights when the class has an auto class.
    auto_name = next(k for k, v in config.auto_map.items() if v.endswith("." + pruned_cls.__name__))
    pruned_cls.register_for_auto_class(auto_name)
