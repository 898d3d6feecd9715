"""Surgery: the only code that changes shapes. Applies a validated ``PruningPlan`` in place.

The whole plan is validated before the first tensor is touched, so a bad plan leaves the model
exactly as it was. Afterwards the model is its ``Pruned*`` twin (see ``pruned_modeling``):
``save_pretrained`` records every layer's shape and ``from_pretrained`` rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn

from .plan import PruningPlan
from .pruned_modeling import adapter_for, mark_pruned


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove the plan's heads, KV groups, neurons and layers from ``model`` (in place).

    Outputs of what remains are exact: the result matches the dense model with the removed
    structures' contributions zeroed. Returns the same model object for chaining.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("model is quantized; prune first, then quantize (packed weights cannot be sliced)")
    plan.validate(model)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    with torch.no_grad():
        for layer in sorted(set(plan.heads) | set(plan.kv_groups)):
            q, kv = plan.kept_heads(model, layer)
            adapter.keep_heads(blocks[layer], torch.tensor(q), torch.tensor(kv))
        for layer, neurons in plan.neurons.items():
            gone = set(neurons)
            keep = [n for n in range(adapter.intermediate_size(blocks[layer])) if n not in gone]
            adapter.keep_neurons(blocks[layer], torch.tensor(keep))
        if plan.layers:
            gone = set(plan.layers)
            adapter.keep_layers(model, [i for i in range(len(blocks)) if i not in gone])
    mark_pruned(model)
    return model


def parameters_removed(model: nn.Module, plan: PruningPlan) -> int:
    """How many parameters ``apply_plan`` will remove, from the plan's arithmetic alone.

    Per query head: its q rows (and bias) plus its o columns; per KV head: its k and v rows;
    per neuron: one row (and bias) of each input projection plus one output column; per layer:
    everything in the block. Tests check surgery against this independent count.
    """
    plan.validate(model)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    removed = sum(sum(p.numel() for p in blocks[i].parameters()) for i in plan.layers)
    for layer in sorted(set(plan.heads) | set(plan.kv_groups)):
        block = blocks[layer]
        q_keep, kv_keep = plan.kept_heads(model, layer)
        q, k, _ = adapter.qkv(block)
        head_dim = adapter.head_dim(model)
        q_row = q.in_features + (q.bias is not None)
        kv_row = k.in_features + (k.bias is not None)
        q_gone = adapter.num_heads(block) - len(q_keep)
        kv_gone = adapter.num_kv_heads(block) - len(kv_keep)
        removed += q_gone * head_dim * (q_row + adapter.o_proj(block).out_features)
        removed += 2 * kv_gone * head_dim * kv_row
    for layer, neurons in plan.neurons.items():
        block = blocks[layer]
        per_neuron = sum(lin.in_features + (lin.bias is not None) for lin in adapter.mlp_in(block))
        removed += len(neurons) * (per_neuron + adapter.mlp_out(block).out_features)
    return removed
