"""Planning for a parameter budget: remove a fraction of the block parameters, the planner picks the mix.

``plan_for_budget(model, calib, fraction=0.2)`` decides how many query heads, KV groups and MLP
neurons every layer loses, and which whole layers go, so that at least ``fraction`` of the
parameters in the transformer blocks is removed (embeddings and the LM head are not counted) at
the least *measured* cost.

The cost of an option is the error it leaves in the residual stream **after reconstruction**
(``course_lib.reconstruction``): for a set of heads or neurons, the least-squares error of the
refitted consumer projection, ``trace(W_S (G^-1)_SS^-1 W_S^T)`` (optimal brain surgeon, exact for
least squares); for a whole block, the change it makes to the stream. Every error is weighted by
``1 / ||h_t||^2`` per token, so it is a *relative* squared error per token: the same currency in
every layer and for every kind of structure. Raw importance scores (Wanda, Taylor, magnitude)
differ in scale from layer to layer and are never compared across layers here.

Per layer the options are: nothing; an attention state (``g`` kept KV groups x ``k`` query heads
per kept group, equal in every group, as the attention kernels need); an MLP width (a multiple of
``lcm(multiple, quant_group_size)``); both; or the whole block. Neurons are ordered by a greedy
optimal-brain-surgeon path (``reconstruction.removal_path``), which gives the cost of every width
in one pass. A dynamic programme over the layers then picks one option per layer with the least
total error whose parameters removed reach the budget. Sensitivities are measured once, on the
unpruned model's activations (``sensitivity``); pass them back in to plan several budgets.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import SettingError
from ._hooks import BlockStream
from .importance._calibration import per_block
from .plan import PruningPlan
from .pruned_modeling import adapter_for
from .reconstruction import DEFAULT_RIDGE, Gram, augmented_weight, obs_cost, removal_path

__all__ = ["BudgetRequest", "LayerSensitivity", "Sensitivity", "block_parameters", "check_budget", "sensitivity",
           "plan_for_budget"]


@dataclass
class LayerSensitivity:
    """What removing each kind of structure of one block costs (relative squared error per token)."""

    layer: int
    params: int  # parameters of the whole block
    block_error: float  # removing the whole block
    head_states: list[dict]  # {"heads": [...], "kv_groups": [...], "params": int, "error": float}
    neuron_order: list[int]  # removal order (cheapest first)
    neuron_errors: list[float]  # cumulative error after removing the first k of neuron_order
    neuron_params: int  # parameters per neuron


@dataclass
class Sensitivity:
    """Every block's costs, as ``sensitivity`` measured them (on ``tokens`` tokens, damping ``ridge``)."""

    layers: list[LayerSensitivity]
    tokens: int
    ridge: float


def _check_fraction(fraction) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction < 1:
        raise SettingError(f"fraction must be a number in (0, 1) (a share of the block parameters), got {fraction!r}")


def block_parameters(model: nn.Module) -> int:
    """Parameters of the transformer blocks: what ``fraction`` is a share of (no embeddings, no head)."""
    return sum(p.numel() for block in adapter_for(model).blocks(model) for p in block.parameters())


def _head_states(adapter, block, gram: Gram, ridge: float) -> list[dict]:
    """Every feasible (kept groups x heads per group) state with the error of its best guess of heads.

    Which heads: each head's own removal cost (the others refitted) ranks heads within a group and
    groups by what they keep; the state's error is then the exact joint cost of that set.
    """
    n_q, n_kv = adapter.num_heads(block), adapter.num_kv_heads(block)
    d = adapter._head_dim(adapter.attention(block))
    size = n_q // n_kv
    inv = torch.linalg.inv(gram.damped(ridge))
    w = augmented_weight(adapter.o_proj(block))
    per_token = max(gram.tokens, 1)
    cols = [torch.arange(h * d, (h + 1) * d) for h in range(n_q)]
    single = [obs_cost(inv, w, c) for c in cols]
    w_q, w_kv = adapter.unit_parameters(block, "query_head"), adapter.unit_parameters(block, "kv_head")
    groups = [sorted(range(j * size, (j + 1) * size), key=lambda h: -single[h]) for j in range(n_kv)]
    states = []
    for g, k in itertools.product(range(1, n_kv + 1), range(1, size + 1)):
        if g * k == n_q:
            continue
        kept_groups = sorted(range(n_kv), key=lambda j: -sum(single[h] for h in groups[j][:k]))[:g]
        kept = {h for j in kept_groups for h in groups[j][:k]}
        removed = [h for h in range(n_q) if h not in kept]
        gone_groups = sorted(set(range(n_kv)) - set(kept_groups))
        heads = [h for h in removed if h // size not in gone_groups]
        error = obs_cost(inv, w, torch.cat([cols[h] for h in removed])) / per_token
        states.append({"kept": g * k, "heads": heads, "kv_groups": gone_groups,
                       "params": len(removed) * w_q + len(gone_groups) * w_kv, "error": error})
    return states


def sensitivity(model: nn.Module, calib, *, max_neuron_fraction: float = 0.75, ridge: float = DEFAULT_RIDGE,
                batch_size: int = 8, step: int = 8, progress: bool = True) -> Sensitivity:
    """Measure every block's costs on the unpruned model's activations (one pass over ``calib``).

    ``max_neuron_fraction`` bounds how much of one MLP the neuron path explores; ``step`` neurons
    are taken per greedy step (1 is exact greedy and slower).
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    stream = BlockStream.capture(model, calib, batch_size=batch_size)
    layers = []
    with torch.no_grad():
        for i in per_block(range(len(blocks)), progress, "sensitivity"):
            block = blocks[i]
            o, out = adapter.o_proj(block), adapter.mlp_out(block)
            grams = {o: Gram(o.in_features, o.weight.device), out: Gram(out.in_features, out.weight.device)}
            weights = stream.weights()
            current = [0]
            handles = [m.register_forward_pre_hook(lambda mod, args: grams[mod].add(args[0], weights[current[0]]))
                       for m in grams]
            try:
                outputs = []
                for b in range(len(stream)):
                    current[0] = b
                    outputs.append(stream.run_one(block, b))
            finally:
                for h in handles:
                    h.remove()
            tokens = grams[out].tokens
            block_error = sum(float(((y - x).to(torch.float64).pow(2).sum(-1) * wt).sum())
                              for x, y, wt in zip(stream.hidden, outputs, weights)) / max(tokens, 1)
            n_inter = out.in_features
            order, errors = removal_path(out, grams[out], 1, int(max_neuron_fraction * n_inter), step=step,
                                         ridge=ridge)
            layers.append(LayerSensitivity(
                layer=i, params=sum(p.numel() for p in block.parameters()), block_error=block_error,
                head_states=_head_states(adapter, block, grams[o], ridge), neuron_order=order,
                neuron_errors=errors, neuron_params=adapter.unit_parameters(block, "neuron")))
            stream.hidden = outputs
    return Sensitivity(layers, tokens=tokens, ridge=ridge)


def _max_removable(adapter, block, align: int, min_heads: int, min_neurons: int, max_neuron_fraction: float,
                   allow: set[str]) -> int:
    """The most parameters one unprotected block can give under the constraints (no data needed)."""
    if "layers" in allow:
        return sum(p.numel() for p in block.parameters())
    most = 0
    if "heads" in allow:
        n_q, n_kv = adapter.num_heads(block), adapter.num_kv_heads(block)
        d, size = adapter._head_dim(adapter.attention(block)), n_q // n_kv
        w_q, w_kv = adapter.unit_parameters(block, "query_head"), adapter.unit_parameters(block, "kv_head")
        most += max([(n_q - g * k) * w_q + (n_kv - g) * w_kv
                     for g, k in itertools.product(range(1, n_kv + 1), range(1, size + 1))
                     if g * k >= min_heads and (g * k * d) % align == 0] + [0])
    if "neurons" in allow:
        n = adapter.intermediate_size(block)
        widths = [n - r for r in range(1, int(max_neuron_fraction * n) + 1)
                  if (n - r) >= min_neurons and (n - r) % align == 0]
        most += (n - min(widths)) * adapter.unit_parameters(block, "neuron") if widths else 0
    return most


def _layer_options(s: LayerSensitivity, n_inter: int, head_dim: int, align: int, min_neurons: int,
                   min_heads: int, allow: set[str]) -> list[dict]:
    heads = [{"params": 0, "error": 0.0, "heads": [], "kv_groups": []}]
    if "heads" in allow:
        heads += [h for h in s.head_states if h["kept"] >= min_heads and (h["kept"] * head_dim) % align == 0]
    widths = [0]
    if "neurons" in allow:
        for removed in range(1, len(s.neuron_errors)):
            kept = n_inter - removed
            if kept >= min_neurons and kept % align == 0 and not math.isnan(s.neuron_errors[removed]):
                widths.append(removed)
    options = []
    for h, r in itertools.product(heads, widths):
        options.append({"params": h["params"] + r * s.neuron_params, "error": h["error"] + s.neuron_errors[r],
                        "heads": h["heads"], "kv_groups": h["kv_groups"],
                        "neurons": sorted(s.neuron_order[:r]), "remove": False})
    if "layers" in allow:
        options.append({"params": s.params, "error": s.block_error, "heads": [], "kv_groups": [], "neurons": [],
                        "remove": True})
    return options


@dataclass(frozen=True)
class BudgetRequest:
    """What ``check_budget`` derived from the arguments: the parameters to remove and the rules they obey."""

    target: int  # block parameters to remove, at least
    protected: list[bool]  # per layer
    align: int  # kept widths are multiples of this
    min_neurons: int


def check_budget(model: nn.Module, *, fraction: float, protect_first: int = 1, protect_last: int = 1,
                 multiple: int = 64, quant_group_size: int | None = None, min_heads: int = 1,
                 min_neurons: int | None = None, max_neuron_fraction: float = 0.75,
                 allow: tuple[str, ...] = ("layers", "heads", "neurons")) -> BudgetRequest:
    """Every check ``plan_for_budget`` makes before measuring anything, from the model's shapes alone.

    A model on the meta device will do, so the pipeline runs this before loading any weights.
    Raises ``SettingError`` naming the argument; returns what the plan is then held to.
    """
    _check_fraction(fraction)
    kinds = ("layers", "heads", "neurons")
    bad = [a for a in allow if a not in kinds]
    if bad or not allow:
        raise SettingError(f"allow={allow!r}: give one or more of {list(kinds)}")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    n_layers = len(blocks)
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SettingError(f"{name} must be a non-negative integer, got {value!r}")
    if protect_first + protect_last >= n_layers:
        raise SettingError(f"protect_first + protect_last = {protect_first + protect_last} leaves none of the "
                           f"{n_layers} layers to prune")
    min_neurons = multiple if min_neurons is None else min_neurons
    for name, value, low in (("multiple", multiple, 1), ("min_heads", min_heads, 1), ("min_neurons", min_neurons, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SettingError(f"{name} must be an integer >= {low}, got {value!r}")
    if quant_group_size is not None and (not isinstance(quant_group_size, int) or quant_group_size < 1):
        raise SettingError(f"quant_group_size must be None or a positive integer, got {quant_group_size!r}")
    if not 0 < max_neuron_fraction < 1:
        raise SettingError(f"max_neuron_fraction must be in (0, 1), got {max_neuron_fraction!r}")
    align = math.lcm(multiple, quant_group_size) if quant_group_size else multiple
    total = block_parameters(model)
    target = math.ceil(fraction * total)
    protected = [i < protect_first or i >= n_layers - protect_last for i in range(n_layers)]
    reachable = sum(_max_removable(adapter, b, align, min_heads, min_neurons, max_neuron_fraction, set(allow))
                    for b, p in zip(blocks, protected) if not p)
    if reachable < target:
        raise SettingError(f"fraction={fraction} asks for {target:,} of {total:,} block parameters but the "
                           f"constraints allow at most {reachable:,} ({reachable / total:.1%}): protect_first="
                           f"{protect_first}, protect_last={protect_last}, alignment {align}, "
                           f"min_neurons={min_neurons}, min_heads={min_heads}, "
                           f"max_neuron_fraction={max_neuron_fraction}, allow={list(allow)}")
    return BudgetRequest(target, protected, align, min_neurons)


def plan_for_budget(model: nn.Module, calib=None, *, fraction: float, protect_first: int = 1,
                    protect_last: int = 1, multiple: int = 64, quant_group_size: int | None = None,
                    min_heads: int = 1, min_neurons: int | None = None, max_neuron_fraction: float = 0.75,
                    allow: tuple[str, ...] = ("layers", "heads", "neurons"), sens: Sensitivity | None = None,
                    progress: bool = True) -> PruningPlan:
    """A validated plan removing at least ``fraction`` of the block parameters at the least measured cost.

    Everything is checked before any scoring work (``check_budget``). ``allow`` restricts the kinds
    of structure the planner may use (for example ``("neurons",)`` for width-only MLP pruning).
    ``min_neurons`` defaults to ``multiple``: an MLP keeps at least one aligned block.
    """
    request = check_budget(model, fraction=fraction, protect_first=protect_first, protect_last=protect_last,
                           multiple=multiple, quant_group_size=quant_group_size, min_heads=min_heads,
                           min_neurons=min_neurons, max_neuron_fraction=max_neuron_fraction, allow=allow)
    target, protected, align, min_neurons = request.target, request.protected, request.align, request.min_neurons
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    n_layers = len(blocks)
    if sens is None:
        if calib is None:
            raise SettingError("calib is required (token ids [N, T] or a list of dicts) unless sens= is given")
        sens = sensitivity(model, calib, max_neuron_fraction=max_neuron_fraction, progress=progress)
    elif len(sens.layers) != n_layers:
        raise SettingError(f"sens describes {len(sens.layers)} layers but the model has {n_layers}")
    options = []
    for i, s in enumerate(sens.layers):
        if protected[i]:
            options.append([{"params": 0, "error": 0.0, "heads": [], "kv_groups": [], "neurons": [],
                             "remove": False}])
        else:
            options.append(_layer_options(s, adapter.intermediate_size(blocks[i]), adapter.head_dim(model), align,
                                          min_neurons, min_heads, set(allow)))
    choice = _cover(options, target)
    if choice is None:  # only if ``sens`` was measured with a smaller max_neuron_fraction
        raise SettingError(f"fraction={fraction}: the sensitivities passed in explore too few neurons to reach "
                           f"{target:,} parameters; measure them with a larger max_neuron_fraction")
    picked = [opts[j] for opts, j in zip(options, choice)]
    plan = PruningPlan(
        heads={i: o["heads"] for i, o in enumerate(picked) if o["heads"]},
        kv_groups={i: o["kv_groups"] for i, o in enumerate(picked) if o["kv_groups"]},
        neurons={i: o["neurons"] for i, o in enumerate(picked) if o["neurons"]},
        layers=[i for i, o in enumerate(picked) if o["remove"]])
    plan.validate(model)
    plan.selection_info = [{"kind": "plan_for_budget", "unit": "parameters", "budget": "parameters",
                            "requested": target, "achieved": sum(o["params"] for o in picked),
                            "rule": "least predicted error reaching the budget",
                            "layers": [{"layer": i, "params": o["params"], "predicted_error": o["error"],
                                        "why": _why(o, protected[i])} for i, o in enumerate(picked)]}]
    return plan


def _why(option: dict, protected: bool) -> str:
    """One line on the choice made for a layer, for the plan summary."""
    if protected:
        return "protected"
    if option["remove"]:
        return "whole block: cheaper than any width cut of the same size"
    if not option["params"]:
        return "kept whole: the least-error plan found no cut here worth its cost"
    return "cheapest cut per parameter for its share of the budget"


def _cover(options: list[list[dict]], target: int) -> list[int] | None:
    """One option per layer, total params >= target, least total error (exact DP in parameter units)."""
    unit = 0
    for opts in options:
        for o in opts:
            unit = math.gcd(unit, int(o["params"]))
    unit = unit or 1
    cells = -(-target // unit)
    inf = float("inf")
    best = np.full(cells + 1, inf)
    best[0] = 0.0
    back = []
    for opts in options:
        new = np.full(cells + 1, inf)
        arg = np.full((cells + 1, 2), -1, dtype=np.int64)
        for j, o in enumerate(opts):
            step = min(int(o["params"]) // unit, cells)
            cand = best + o["error"]
            # uncapped moves: cell c -> c + step
            src = np.arange(cells + 1 - step) if step else np.arange(cells + 1)
            dst = src + step
            if step:
                src, dst = src[:-1], dst[:-1]
            better = cand[src] < new[dst]
            new[dst[better]] = cand[src[better]]
            arg[dst[better]] = np.stack([np.full(better.sum(), j), src[better]], axis=1)
            if step:  # everything from cells - step on reaches the (capped) target cell
                s = cells - step + int(np.argmin(cand[cells - step:]))
                if cand[s] < new[cells]:
                    new[cells], arg[cells] = cand[s], (j, s)
        back.append(arg)
        best = new
    if not np.isfinite(best[cells]):
        return None
    choice, cell = [], cells
    for arg in reversed(back):
        j, cell = arg[cell]
        choice.append(int(j))
    return choice[::-1]
