"""``PruningPlan``: what to remove, as plain data, checked against a model before any change.

Indices always refer to the unpruned model's numbering (layer ``i``, query head ``h``, KV group
``g``, intermediate neuron ``n``). A plan is JSON-serialisable so it can be saved beside a
report, edited by hand, or produced by one machine and applied on another.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .errors import SettingError
from .pruned_modeling import FamilyAdapter, adapter_for


@dataclass
class PruningPlan:
    """Structures to remove.

    heads:     {layer: [query heads]}. A KV group that loses all its query heads goes too; the
               groups that stay must keep equal sizes (the attention kernels assume it).
    kv_groups: {layer: [KV groups]} removed whole, with their query heads (GQA / MQA models).
    neurons:   {layer: [intermediate neurons]} (for gated MLPs, rows of gate and up together).
    layers:    [blocks] removed whole.
    """

    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_groups: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Normalise JSON string keys to ints; keep duplicates visible to validate(), never dedupe.
        for name in ("heads", "kv_groups", "neurons"):
            table = getattr(self, name)
            if not isinstance(table, dict):
                raise SettingError(f"{name} must be a mapping {{layer: [indices]}}, got {type(table).__name__}")
            setattr(self, name, {_index(name, k): _indices(f"{name}[{k}]", v) for k, v in table.items()})
        self.layers = _indices("layers", self.layers)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "heads": {str(k): sorted(v) for k, v in sorted(self.heads.items()) if v},
            "kv_groups": {str(k): sorted(v) for k, v in sorted(self.kv_groups.items()) if v},
            "neurons": {str(k): sorted(v) for k, v in sorted(self.neurons.items()) if v},
            "layers": sorted(self.layers),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        unknown = set(data) - {"heads", "kv_groups", "neurons", "layers"}
        if unknown:
            raise SettingError(f"plan has unknown keys {sorted(unknown)}; allowed: heads, kv_groups, neurons, layers")
        return cls(**data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruningPlan) and self.to_dict() == other.to_dict()

    # ---- meaning against a model -----------------------------------------------------------------
    def kept_heads(self, model: nn.Module, layer: int) -> tuple[list[int], list[int]]:
        """(query heads, KV heads) that layer ``layer`` keeps; assumes a validated plan."""
        adapter = adapter_for(model)
        block = adapter.blocks(model)[layer]
        n_q, n_kv = adapter.num_heads(block), adapter.num_kv_heads(block)
        group = n_q // n_kv
        gone_groups = set(self.kv_groups.get(layer, []))
        gone = set(self.heads.get(layer, [])) | {h for g in gone_groups for h in range(g * group, (g + 1) * group)}
        q = [h for h in range(n_q) if h not in gone]
        kv = sorted({h // group for h in q})
        return q, kv

    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the layer and the problem; never touches the model."""
        adapter = adapter_for(model)
        blocks = adapter.blocks(model)
        n_layers = len(blocks)
        _check_indices("layers", None, self.layers, n_layers)
        if len(self.layers) >= n_layers:
            raise SettingError(f"layers: the plan removes all {n_layers} layers; at least one must stay")
        removed = set(self.layers)
        for name, table in (("heads", self.heads), ("kv_groups", self.kv_groups), ("neurons", self.neurons)):
            for layer in table:
                _check_indices(name, None, [layer], n_layers, what="layer")
                if layer in removed and table[layer]:
                    raise SettingError(f"{name}: layer {layer} is removed whole by `layers`; drop its {name} entry")
        for layer in sorted(set(self.heads) | set(self.kv_groups)):
            self._validate_heads(adapter, blocks[layer], layer)
        for layer, neurons in self.neurons.items():
            size = adapter.intermediate_size(blocks[layer])
            _check_indices("neurons", layer, neurons, size)
            if len(neurons) >= size:
                raise SettingError(f"neurons: layer {layer} would keep 0 of {size} neurons; keep at least one")

    def _validate_heads(self, adapter: FamilyAdapter, block: nn.Module, layer: int) -> None:
        n_q, n_kv = adapter.num_heads(block), adapter.num_kv_heads(block)
        group = n_q // n_kv
        heads, groups = self.heads.get(layer, []), self.kv_groups.get(layer, [])
        _check_indices("heads", layer, heads, n_q)
        _check_indices("kv_groups", layer, groups, n_kv)
        overlap = sorted(h for h in heads if h // group in set(groups))
        if overlap:
            raise SettingError(f"heads: layer {layer} lists query heads {overlap} whose KV groups are removed whole")
        remaining = {g: group for g in range(n_kv) if g not in set(groups)}
        for h in heads:
            remaining[h // group] -= 1
        sizes = sorted({n for n in remaining.values() if n > 0})
        if not sizes:
            raise SettingError(f"heads: layer {layer} would keep 0 of {n_q} query heads; keep at least one")
        if len(sizes) > 1:
            per_group = {g: n for g, n in remaining.items() if n > 0}
            raise SettingError(
                f"heads: layer {layer} leaves KV groups with unequal query heads {per_group} "
                f"(group size {group}); remove the same number of query heads from every kept group"
            )


def _index(name: str, value) -> int:
    """An integer index (an int, an integral float from JSON, or a numeric string key)."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SettingError(f"{name}: index {value!r} is not an integer")
    return int(value)


def _indices(name: str, values) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise SettingError(f"{name} must be a list of integer indices, got {values!r}")
    return [_index(name, v) for v in values]


def _check_indices(name: str, layer: int | None, indices: list[int], size: int, what: str | None = None) -> None:
    where = f"layer {layer}: " if layer is not None else ""
    what = what or name
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise SettingError(f"{name}: {where}{what} index {bad} out of range [0, {size})")
    dupes = sorted(i for i, n in Counter(indices).items() if n > 1)
    if dupes:
        raise SettingError(f"{name}: {where}duplicate {what} index {dupes}")


def parameters_removed(model: nn.Module, plan: PruningPlan) -> int:
    """How many parameters ``surgery.apply_plan`` will remove, from the plan's arithmetic alone.

    Each query head, KV head and neuron removes what its family's map says one unit owns
    (``FamilyAdapter.unit_parameters``: q rows and o columns; k and v rows; one row of each MLP
    input projection and one output column); a layer removes everything in its block. Tests
    check surgery against this independent count.
    """
    plan.validate(model)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    removed = sum(sum(p.numel() for p in blocks[i].parameters()) for i in plan.layers)
    for layer in sorted(set(plan.heads) | set(plan.kv_groups)):
        block = blocks[layer]
        q_keep, kv_keep = plan.kept_heads(model, layer)
        removed += (adapter.num_heads(block) - len(q_keep)) * adapter.unit_parameters(block, "query_head")
        removed += (adapter.num_kv_heads(block) - len(kv_keep)) * adapter.unit_parameters(block, "kv_head")
    for layer, neurons in plan.neurons.items():
        removed += len(neurons) * adapter.unit_parameters(blocks[layer], "neuron")
    return removed
