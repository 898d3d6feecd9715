"""Surgery: the only code that changes shapes. Applies a validated ``PruningPlan`` in place.

The whole plan is validated before the first tensor is touched, so a bad plan leaves the model
exactly as it was. Afterwards the model is its ``Pruned*`` twin (see ``pruned_modeling``):
``save_pretrained`` records every layer's shape and ``from_pretrained`` rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SettingError
from .plan import PruningPlan, parameters_removed  # noqa: F401 - parameters_removed: part of this API
from .pruned_modeling import adapter_for, mark_pruned


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove the plan's heads, KV groups, neurons and layers from ``model`` (in place).

    Outputs of what remains are exact: the result matches the dense model with the removed
    structures' contributions zeroed. Returns the same model object for chaining.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        raise SettingError("model is quantized; prune first, then quantize (packed weights cannot be sliced)")
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
