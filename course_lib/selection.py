"""Selection: importance scores -> a validated ``PruningPlan``.

Scores come from ``course_lib`` scoring (higher = more important):

* head scores     ``[L, H_max]`` (NaN where a layer has fewer heads),
* KV-group scores ``[L, G_max]`` (NaN padded),
* neuron scores   ``list[Tensor]``, one ``[intermediate_size]`` vector per layer
  (a NaN-padded ``[L, I_max]`` tensor is accepted too),
* layer scores    ``[L]``.

Public API
----------
``select_heads``, ``select_neurons``, ``select_layers``, ``select_span``, ``merge_plans``,
``plan_summary``, ``format_summary``, ``selection_info``. The JSON of a plan is
``PruningPlan.to_json``.

How heads and neurons are chosen
--------------------------------
1. **Ranking.** Every structure gets a global rank by ``(score, layer, index)``: the lowest
   score first, ties broken by the lower layer, then the lower index. Deterministic.
2. **Feasible per-layer states.** For each layer we list the states it may end in, each with
   the structures it removes:

   * neurons: remove the ``r`` lowest-ranked neurons of the layer;
   * query heads (``granularity="query"``): a state is ``(g kept KV groups, k heads per kept
     group)``; the layer keeps, in each of its ``g`` best groups, the group's ``k`` best heads
     and removes everything else, so every kept group has the same size (what the attention
     kernels need); a group losing all its heads disappears. Among the ``(g, k)`` with the same
     number of kept heads the one removing the least score is used;
   * KV groups (``granularity="kv_group"``): remove the ``j`` lowest-ranked groups of the layer.

   A state is feasible when the layer keeps at least ``min_heads`` / ``min_neurons`` (and at
   least one), when the layer is not protected (protected layers only have "remove nothing"),
   and, for a layer that is pruned at all, when the kept width is a multiple of
   ``align = lcm(multiple, quant_group_size)`` (see *Alignment*).
3. **Global choice.** Choose one state per layer so that the number of removed structures is
   exactly the target and the removed score is the least possible (ties: the least sum of global
   ranks, i.e. the choice closest to the global ranking). When every layer moves in equal steps
   with non-decreasing step costs (always the case for MHA heads, KV groups and neurons) this is
   a greedy over the steps in ``(step score, step ranks, layer)`` order — with ``multiple=1`` on
   an MHA model or on neurons it is *exactly* "remove the ``n`` lowest by ``(score, layer,
   index)``". Otherwise (GQA query heads, layers of unaligned width) an exact dynamic programme
   over the layers is used; only for a huge irregular problem (> ~5e7 DP cells, not met by
   stock models) a greedy that skips steps that would overshoot is used instead.

Alignment and exact counts
--------------------------
``multiple`` (default 64) makes each *pruned* layer's kept width a multiple of it: query width
``kept_heads * head_dim`` for heads, kept intermediate neurons for the MLP; layers left whole stay
as they are. ``quant_group_size`` (e.g. AWQ's 64/128) adds the same constraint, and both combine
as ``lcm``. ``multiple=1`` turns alignment off. For heads the kept count therefore moves in
steps of ``align / gcd(align, head_dim)`` heads: MiniLM (head_dim 32, 12 heads) aligned to 64
moves in steps of 2 heads; SmolLM2 (head_dim 64) in steps of 1. When ``head_dim`` doesn't divide
``align`` nicely (e.g. 80 or 96) the nearest feasible width — the next multiple of
``lcm(align, head_dim)`` — is used; a layer too small for any aligned width stays whole.

*Rule for counts.* The count removed is the **largest achievable count that does not exceed the
request** (round down, never above the budget). With ``multiple=1`` on MHA heads, KV groups or
neurons every count is achievable, so it is exact; with alignment it is exact with respect to the
aligned steps (e.g. MiniLM at 64: asking for 5 heads removes 4). When the achieved count differs
from the request a ``UserWarning`` says so, or ``strict=True`` raises ``ValueError`` instead. The
request and the achieved count are recorded in ``selection_info(plan)`` and printed by
``format_summary(rows, plan)``. A request beyond what the constraints allow at all (protections,
minimums, alignment) raises ``ValueError``.

Parameter budgets
-----------------
With ``budget="parameters"``, ``fraction`` is a fraction of the parameters of those structures
(all heads' q/k/v/o parameters, or all MLP parameters of the neurons) and ``count`` a number of
parameters. The per-structure cost follows ``plan.parameters_removed``: a query head costs its q
rows (and bias) plus its o columns; a KV group that disappears adds its k and v rows; a neuron
costs one row (and bias) of each input projection plus one output column. Rule: rank exactly as
above and take the **largest number of structures whose selection removes no more parameters than
the budget** (the budget is a ceiling, never exceeded).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import SettingError
from .plan import PruningPlan, parameters_removed
from .pruned_modeling import adapter_for

__all__ = [
    "select_heads",
    "select_neurons",
    "select_layers",
    "select_span",
    "merge_plans",
    "plan_summary",
    "format_summary",
    "selection_info",
    "layer_normalised",
]

BUDGETS = ("structures", "parameters")
GRANULARITIES = ("query", "kv_group")
_DP_CELL_LIMIT = 50_000_000
_EPS = 1e-9


# ---- argument checks (all run before any work) -------------------------------------------------
def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise SettingError(f"{name}={value!r} is unknown; allowed values: {list(allowed)}")


def _check_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SettingError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SettingError(f"{name} must be >= {minimum}, got {value}")


def _check_amount(fraction, count) -> None:
    if (fraction is None) == (count is None):
        raise SettingError(
            f"give exactly one of fraction and count (got fraction={fraction!r}, count={count!r})"
        )
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
            raise SettingError(f"fraction must be in [0, 1), got {fraction!r}")
        if not (0 <= float(fraction) < 1):
            raise SettingError(f"fraction must be in [0, 1), got {fraction}")
    else:
        _check_int("count", count)
        if count < 0:
            raise SettingError(f"count must be >= 0, got {count}")


def _check_protect(protect_first, protect_last, n_layers: int) -> None:
    _check_int("protect_first", protect_first, 0)
    _check_int("protect_last", protect_last, 0)
    if protect_first + protect_last >= n_layers:
        raise SettingError(
            f"protect_first + protect_last = {protect_first + protect_last} but the model has {n_layers} layers; "
            "at least one layer must stay unprotected"
        )


def _protected(layer: int, n_layers: int, protect_first: int, protect_last: int) -> bool:
    return layer < protect_first or layer >= n_layers - protect_last


def _alignment(multiple, quant_group_size) -> int:
    _check_int("multiple", multiple, 1)
    _check_int("quant_group_size", quant_group_size, 1, allow_none=True)
    return math.lcm(int(multiple), int(quant_group_size)) if quant_group_size else int(multiple)


def _requested(fraction, count, total: int, unit: str) -> int:
    """The requested amount in ``unit`` (structures or parameters); rounds a fraction down."""
    if fraction is not None:
        return int(math.floor(float(fraction) * total + _EPS))
    if count > total:
        raise SettingError(f"count={count} is out of range [0, {total}] ({unit} in the model)")
    return int(count)


def _as_array(scores, name: str = "scores") -> np.ndarray:
    try:
        arr = torch.as_tensor(scores).detach().to(torch.float64).cpu().numpy()
    except Exception as exc:  # noqa: BLE001 - anything that isn't numeric
        raise SettingError(f"{name} must be a numeric tensor, got {type(scores).__name__}") from exc
    return arr


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        raise SettingError(f"scores: {what} {bad[0].tolist()} is NaN or infinite; scores must be finite")


# ---- per-layer feasible states -----------------------------------------------------------------
@dataclass
class _Options:
    """Feasible states of one layer; option 0 removes nothing. Arrays are indexed by option."""

    layer: int
    removed: np.ndarray  # structures removed (strictly increasing, removed[0] == 0)
    score: np.ndarray  # removed score (cumulative)
    rank: np.ndarray  # removed sum of global ranks
    weight: np.ndarray  # parameters removed
    step_score: np.ndarray  # key of the step option j-1 -> j (index 0 unused)
    step_rank: np.ndarray
    payload: Callable[[int], list[int]]  # option -> removed indices (heads, groups or neurons)


def _global_ranks(values: list[np.ndarray]) -> list[np.ndarray]:
    """Rank of every entry by (score, layer, index) over all layers."""
    scores = np.concatenate(values) if values else np.zeros(0)
    layers = np.concatenate([np.full(len(v), i) for i, v in enumerate(values)]) if values else np.zeros(0)
    index = np.concatenate([np.arange(len(v)) for v in values]) if values else np.zeros(0)
    order = np.lexsort((index, layers, scores))
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(len(scores), dtype=np.float64)
    out, start = [], 0
    for v in values:
        out.append(ranks[start : start + len(v)])
        start += len(v)
    return out


def _prefix_options(layer, scores, ranks, feasible_r, unit_weight, payload_fn=None) -> _Options:
    """States "remove the r lowest-ranked items" for r in ``feasible_r`` (sorted, starting at 0)."""
    order = np.argsort(ranks, kind="stable")
    s_sorted, r_sorted = scores[order], ranks[order]
    r = np.asarray(feasible_r, dtype=np.int64)
    cum_s = np.concatenate([[0.0], np.cumsum(s_sorted)])
    cum_r = np.concatenate([[0.0], np.cumsum(r_sorted)])
    step_s, step_r = np.zeros(len(r)), np.zeros(len(r))
    if len(r) > 1:
        # sum each step directly: exact for single items, so ties compare exactly
        step_s[1:] = np.add.reduceat(s_sorted[: r[-1]], r[:-1])
        step_r[1:] = np.add.reduceat(r_sorted[: r[-1]], r[:-1])
    payload = payload_fn or (lambda j: sorted(order[: r[j]].tolist()))
    return _Options(layer, r, cum_s[r], cum_r[r], r * unit_weight, step_s, step_r, payload)


def _aligned_ok(kept: int, total: int, width: int, align: int) -> bool:
    return kept == total or (kept * width) % align == 0


def _head_options(layer, scores, ranks, n_q, n_kv, head_dim, align, min_heads, protected, w_q, w_kv) -> _Options:
    """Query-head states (g kept groups x k heads per group); see the module docstring."""
    size = n_q // n_kv
    groups = [sorted(range(j * size, (j + 1) * size), key=lambda h: ranks[h]) for j in range(n_kv)]
    best: dict[int, tuple] = {0: (0.0, 0.0, 0, [])}
    if not protected:
        for g in range(1, n_kv + 1):
            for k in range(1, size + 1):
                kept = g * k
                if kept == n_q or kept < min_heads or not _aligned_ok(kept, n_q, head_dim, align):
                    continue
                keep_key = sorted(
                    range(n_kv),
                    key=lambda j: (scores[groups[j][size - k :]].sum(), ranks[groups[j][size - k :]].sum(), j),
                )
                dropped = keep_key[: n_kv - g]
                removed = [h for j in dropped for h in groups[j]]
                removed += [h for j in keep_key[n_kv - g :] for h in groups[j][: size - k]]
                removed.sort(key=lambda h: ranks[h])
                key = (float(np.sum(scores[removed])), float(np.sum(ranks[removed])))
                r = n_q - kept
                weight = r * w_q + (n_kv - g) * w_kv
                if r not in best or key < best[r][:2]:
                    best[r] = (*key, weight, sorted(removed))
    rs = sorted(best)
    score = np.array([best[r][0] for r in rs])
    rank = np.array([best[r][1] for r in rs])
    step_s, step_r = np.zeros(len(rs)), np.zeros(len(rs))
    for j in range(1, len(rs)):
        prev, cur = set(best[rs[j - 1]][3]), best[rs[j]][3]
        if prev <= set(cur):  # nested states: sum the step directly (exact ties)
            new = sorted((h for h in cur if h not in prev), key=lambda h: ranks[h])
            step_s[j], step_r[j] = float(np.sum(scores[new])), float(np.sum(ranks[new]))
        else:
            step_s[j], step_r[j] = score[j] - score[j - 1], rank[j] - rank[j - 1]
    return _Options(layer, np.array(rs, dtype=np.int64), score, rank,
                    np.array([best[r][2] for r in rs], dtype=np.int64), step_s, step_r,
                    lambda j: list(best[rs[j]][3]))


# ---- the global choice -------------------------------------------------------------------------
def _regular_step(opts: list[_Options]) -> int | None:
    """The common step q if every layer's states are 0, q, 2q, ... with non-decreasing step keys."""
    q = None
    for o in opts:
        if len(o.removed) < 2:
            continue
        steps = np.diff(o.removed)
        if not np.all(steps == steps[0]) or (q is not None and steps[0] != q):
            return None
        q = int(steps[0])
        s, r = o.step_score[1:], o.step_rank[1:]
        if np.any((s[1:] < s[:-1]) | ((s[1:] == s[:-1]) & (r[1:] < r[:-1]))):
            return None
    return q or 1


def _solve(opts: list[_Options], *, target: int | None = None, max_weight: int | None = None) -> list[int]:
    """One option index per layer: removes ``<= target`` structures (the largest achievable count)
    or ``<= max_weight`` parameters, with the least removed (score, rank sum)."""
    q = _regular_step(opts)
    if q is not None:
        return _solve_greedy(opts, q, target, max_weight)
    g = 0
    for o in opts:
        for r in o.removed:
            g = math.gcd(g, int(r))
    g = g or 1
    units = sum(int(o.removed[-1]) for o in opts) // g
    if target is not None:
        units = min(units, target // g)
    if sum(len(o.removed) for o in opts) * (units + 1) <= _DP_CELL_LIMIT:
        return _solve_dp(opts, g, units, target, max_weight)
    return _solve_skip_greedy(opts, target, max_weight)


def _solve_greedy(opts, q, target, max_weight) -> list[int]:
    parts = [(o.step_score[1:], o.step_rank[1:], np.full(len(o.removed) - 1, i), np.arange(1, len(o.removed)),
              np.diff(o.weight)) for i, o in enumerate(opts) if len(o.removed) > 1]
    if not parts:
        return [0] * len(opts)
    s, r, li, jj, w = (np.concatenate(c) for c in zip(*parts))
    order = np.lexsort((jj, li, r, s))
    if target is not None:
        take = min(target // q, len(order))
    else:
        take = int(np.searchsorted(np.cumsum(w[order]), max_weight, side="right"))
    choice = np.bincount(li[order[:take]].astype(np.int64), minlength=len(opts))
    return [int(c) for c in choice]


def _solve_dp(opts, g, units, target, max_weight) -> list[int]:
    n = units + 1
    best_s = np.full(n, np.inf)
    best_r = np.full(n, np.inf)
    best_w = np.zeros(n, dtype=np.int64)
    best_s[0] = best_r[0] = 0.0
    choices = []
    for o in opts:
        new_s, new_r = np.full(n, np.inf), np.full(n, np.inf)
        new_w, ch = np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        for j, removed in enumerate(o.removed):
            u = int(removed) // g
            if u >= n:
                break
            cand_s, cand_r = np.full(n, np.inf), np.full(n, np.inf)
            cand_s[u:] = best_s[: n - u] + o.score[j]
            cand_r[u:] = best_r[: n - u] + o.rank[j]
            cand_w = np.zeros(n, dtype=np.int64)
            cand_w[u:] = best_w[: n - u] + o.weight[j]
            better = (cand_s < new_s) | ((cand_s == new_s) & (cand_r < new_r))
            new_s[better], new_r[better], new_w[better], ch[better] = cand_s[better], cand_r[better], cand_w[better], j
        best_s, best_r, best_w = new_s, new_r, new_w
        choices.append(ch)
    ok = np.isfinite(best_s)
    if max_weight is not None:
        ok &= best_w <= max_weight
    u = int(np.flatnonzero(ok).max())  # u = 0 is always reachable
    out = [0] * len(opts)
    for i in range(len(opts) - 1, -1, -1):
        j = int(choices[i][u])
        out[i] = j
        u -= int(opts[i].removed[j]) // g
    return out


def _solve_skip_greedy(opts, target, max_weight) -> list[int]:
    """Approximate fallback: steps in key order, a layer's steps in its own order, skipping a step
    (and the layer's later steps) when it would overshoot the budget."""
    import heapq

    choice = [0] * len(opts)
    heap = [(o.step_score[1], o.step_rank[1], i) for i, o in enumerate(opts) if len(o.removed) > 1]
    heapq.heapify(heap)
    used_n, used_w = 0, 0
    while heap:
        _, _, i = heapq.heappop(heap)
        o, j = opts[i], choice[i] + 1
        dn, dw = int(o.removed[j] - o.removed[j - 1]), int(o.weight[j] - o.weight[j - 1])
        if (target is not None and used_n + dn > target) or (max_weight is not None and used_w + dw > max_weight):
            continue
        choice[i], used_n, used_w = j, used_n + dn, used_w + dw
        if j + 1 < len(o.removed):
            heapq.heappush(heap, (o.step_score[j + 1], o.step_rank[j + 1], i))
    return choice


def _run(opts, *, budget, requested, unit, kind, strict, constraint_text) -> tuple[list[int], dict]:
    """Check the request against what the constraints allow, solve, and describe the outcome."""
    if budget == "structures":
        capacity = sum(int(o.removed[-1]) for o in opts)
        if requested > capacity:
            raise SettingError(
                f"{kind}: {requested} {unit} requested but at most {capacity} can be removed with {constraint_text}"
            )
        choice = _solve(opts, target=requested)
    else:
        capacity = sum(int(o.weight.max()) for o in opts)
        if requested > capacity:
            raise SettingError(
                f"{kind}: a budget of {requested} parameters was requested but at most {capacity} can be removed "
                f"with {constraint_text}"
            )
        choice = _solve(opts, max_weight=requested)
    achieved = sum(int(o.removed[j]) for o, j in zip(opts, choice))
    achieved_w = sum(int(o.weight[j]) for o, j in zip(opts, choice))
    info = {
        "kind": kind,
        "unit": unit,
        "budget": budget,
        "requested": requested,
        "achieved": achieved,
        "achieved_parameters": achieved_w,
        "rule": "largest achievable count not above the request" if budget == "structures"
        else "largest selection whose parameters do not exceed the budget",
    }
    if budget == "structures" and achieved != requested:
        msg = (f"{kind}: {requested} {unit} requested but only {achieved} are achievable with {constraint_text} "
               f"(rounded down to the nearest feasible configuration)")
        if strict:
            raise SettingError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return choice, info


def _attach(plan: PruningPlan, infos: list[dict]) -> PruningPlan:
    plan.selection_info = list(infos)
    return plan


def selection_info(plan: PruningPlan) -> list[dict]:
    """What the selectors recorded on ``plan``: requested vs achieved per selection call."""
    return list(getattr(plan, "selection_info", []))


# ---- heads -------------------------------------------------------------------------------------
def _head_costs(adapter, block) -> tuple[int, int]:
    """Parameters of one query head and of one KV head (as in ``plan.parameters_removed``)."""
    return adapter.unit_parameters(block, "query_head"), adapter.unit_parameters(block, "kv_head")


def select_heads(
    model: nn.Module,
    scores,
    *,
    fraction: float | None = None,
    count: int | None = None,
    budget: str = "structures",
    granularity: str = "query",
    protect_first: int = 0,
    protect_last: int = 0,
    min_heads: int = 1,
    multiple: int = 64,
    quant_group_size: int | None = None,
    strict: bool = False,
) -> PruningPlan:
    """Remove the least important attention heads (or whole KV groups), globally across layers.

    ``scores``: ``[L, H_max]`` head scores (NaN padded), or for ``granularity="kv_group"`` also
    ``[L, G_max]`` group scores (a group's score is the sum of its heads' scores otherwise).
    ``fraction`` / ``count``: of query heads (``"query"``), of KV groups (``"kv_group"``), or with
    ``budget="parameters"`` of those structures' parameters. See the module docstring for the
    algorithm, the alignment rule and the rounding of counts. Returns a validated plan.
    """
    _check_choice("budget", budget, BUDGETS)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_amount(fraction, count)
    _check_int("min_heads", min_heads, 1)
    align = _alignment(multiple, quant_group_size)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    n_layers = len(blocks)
    _check_protect(protect_first, protect_last, n_layers)
    head_dim = adapter.head_dim(model)
    n_q = [adapter.num_heads(b) for b in blocks]
    n_kv = [adapter.num_kv_heads(b) for b in blocks]
    arr = _as_array(scores)
    h_max, g_max = max(n_q), max(n_kv)
    allowed = {(n_layers, h_max): "[num_layers, max query heads]"}
    if granularity == "kv_group":
        allowed.setdefault((n_layers, g_max), "[num_layers, max KV groups]")
    if tuple(arr.shape) not in allowed:
        raise SettingError(
            f"scores has shape {tuple(arr.shape)} but select_heads(granularity={granularity!r}) needs "
            + " or ".join(f"{shape} {what}" for shape, what in allowed.items())
        )
    group_scores = granularity == "kv_group" and arr.shape[1] != h_max
    width = [n_kv[i] if group_scores else n_q[i] for i in range(n_layers)]
    for i in range(n_layers):
        _check_finite(arr[i, : width[i]], f"layer {i}, {'group' if group_scores else 'head'}")
    costs = [_head_costs(adapter, b) for b in blocks]

    unit = "query heads" if granularity == "query" else "KV groups"
    if budget == "structures":
        total = sum(n_q) if granularity == "query" else sum(n_kv)
    else:
        total = sum(n_q[i] * costs[i][0] + n_kv[i] * costs[i][1] for i in range(n_layers))
    requested = _requested(fraction, count, total, unit if budget == "structures" else "head parameters")

    opts: list[_Options] = []
    if granularity == "query":
        values = [arr[i, : n_q[i]] for i in range(n_layers)]
        ranks = _global_ranks(values)
        for i in range(n_layers):
            opts.append(_head_options(i, values[i], ranks[i], n_q[i], n_kv[i], head_dim, align, min_heads,
                                      _protected(i, n_layers, protect_first, protect_last), *costs[i]))
    else:
        values = []
        for i in range(n_layers):
            if group_scores:
                values.append(arr[i, : n_kv[i]].copy())
            else:
                size = n_q[i] // n_kv[i]
                values.append(np.array([math.fsum(arr[i, j * size : (j + 1) * size]) for j in range(n_kv[i])]))
        ranks = _global_ranks(values)
        for i in range(n_layers):
            size = n_q[i] // n_kv[i]
            feasible = [0]
            if not _protected(i, n_layers, protect_first, protect_last):
                for j in range(1, n_kv[i]):
                    kept = (n_kv[i] - j) * size
                    if kept >= min_heads and _aligned_ok(kept, n_q[i], head_dim, align):
                        feasible.append(j)
            opts.append(_prefix_options(i, values[i], ranks[i], feasible, size * costs[i][0] + costs[i][1]))

    constraint_text = (f"protect_first={protect_first}, protect_last={protect_last}, min_heads={min_heads}, "
                       f"multiple={multiple}, quant_group_size={quant_group_size} (head_dim {head_dim}; "
                       f"a pruned layer keeps a multiple of {align // math.gcd(align, head_dim)} heads"
                       + (", equal heads in every kept KV group)" if granularity == "query" else ")"))
    choice, info = _run(opts, budget=budget, requested=requested, unit=unit, kind="select_heads",
                        strict=strict, constraint_text=constraint_text)
    field = "heads" if granularity == "query" else "kv_groups"
    table = {o.layer: o.payload(j) for o, j in zip(opts, choice) if j > 0}
    plan = PruningPlan(**{field: table})
    plan.validate(model)
    return _attach(plan, [info])


# ---- neurons -----------------------------------------------------------------------------------
def _neuron_scores(scores, sizes: list[int]) -> list[np.ndarray]:
    n_layers = len(sizes)
    if isinstance(scores, (list, tuple)):
        if len(scores) != n_layers:
            raise SettingError(f"scores has {len(scores)} entries but the model has {n_layers} layers "
                               "(need one [intermediate_size] vector per layer)")
        out = [_as_array(s, f"scores[{i}]") for i, s in enumerate(scores)]
        for i, (a, n) in enumerate(zip(out, sizes)):
            if a.ndim != 1 or a.shape[0] != n:
                raise SettingError(f"scores[{i}] has shape {tuple(a.shape)} but layer {i} has {n} neurons; "
                                   f"expected ({n},)")
        return out
    arr = _as_array(scores)
    if arr.ndim != 2 or arr.shape != (n_layers, max(sizes)):
        raise SettingError(f"scores has shape {tuple(arr.shape)} but select_neurons needs a list of {n_layers} "
                           f"per-layer vectors or a NaN-padded tensor of shape {(n_layers, max(sizes))}")
    return [arr[i, :n].copy() for i, n in enumerate(sizes)]


def select_neurons(
    model: nn.Module,
    scores,
    *,
    fraction: float | None = None,
    count: int | None = None,
    budget: str = "structures",
    protect_first: int = 0,
    protect_last: int = 0,
    min_neurons: int = 1,
    multiple: int = 64,
    quant_group_size: int | None = None,
    strict: bool = False,
) -> PruningPlan:
    """Remove the least important intermediate (MLP) neurons, globally across layers.

    Each pruned layer keeps a multiple of ``lcm(multiple, quant_group_size)`` neurons and at least
    ``max(min_neurons, 1)``; protected layers are untouched; a layer is never emptied. See the
    module docstring for the ranking and the rounding rule. Returns a validated plan.
    """
    _check_choice("budget", budget, BUDGETS)
    _check_amount(fraction, count)
    _check_int("min_neurons", min_neurons, 1)
    align = _alignment(multiple, quant_group_size)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    n_layers = len(blocks)
    _check_protect(protect_first, protect_last, n_layers)
    sizes = [adapter.intermediate_size(b) for b in blocks]
    values = _neuron_scores(scores, sizes)
    for i, v in enumerate(values):
        _check_finite(v, f"layer {i}, neuron")
    per_neuron = [adapter.unit_parameters(b, "neuron") for b in blocks]
    total = sum(sizes) if budget == "structures" else sum(n * w for n, w in zip(sizes, per_neuron))
    requested = _requested(fraction, count, total, "neurons" if budget == "structures" else "neuron parameters")

    ranks = _global_ranks(values)
    opts = []
    for i, n in enumerate(sizes):
        feasible = [0]
        if not _protected(i, n_layers, protect_first, protect_last):
            lowest = max(min_neurons, 1)
            kept = np.arange(n - 1, lowest - 1, -1)
            kept = kept[kept % align == 0] if align > 1 else kept
            feasible += (n - kept).tolist()
        opts.append(_prefix_options(i, values[i], ranks[i], feasible, per_neuron[i]))
    constraint_text = (f"protect_first={protect_first}, protect_last={protect_last}, min_neurons={min_neurons}, "
                       f"multiple={multiple}, quant_group_size={quant_group_size} "
                       f"(a pruned layer keeps a multiple of {align} neurons)")
    choice, info = _run(opts, budget=budget, requested=requested, unit="neurons", kind="select_neurons",
                        strict=strict, constraint_text=constraint_text)
    plan = PruningPlan(neurons={o.layer: o.payload(j) for o, j in zip(opts, choice) if j > 0})
    plan.validate(model)
    return _attach(plan, [info])


# ---- layers ------------------------------------------------------------------------------------
def select_layers(
    model: nn.Module,
    scores,
    *,
    fraction: float | None = None,
    count: int | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
) -> PruningPlan:
    """Remove the ``count`` (or ``floor(fraction * L)``) lowest-scored unprotected blocks.

    Ties are broken by the lower layer index. At least one block always stays.
    """
    _check_amount(fraction, count)
    adapter = adapter_for(model)
    n_layers = len(adapter.blocks(model))
    _check_protect(protect_first, protect_last, n_layers)
    arr = _as_array(scores)
    if arr.shape != (n_layers,):
        raise SettingError(f"scores has shape {tuple(arr.shape)} but select_layers needs ({n_layers},) (one per layer)")
    _check_finite(arr, "layer")
    if count is not None and count > n_layers - 1:
        raise SettingError(f"count={count} is out of range [0, {n_layers - 1}] (at least one of {n_layers} layers stays)")
    requested = _requested(fraction, count, n_layers, "layers")
    candidates = [i for i in range(n_layers) if not _protected(i, n_layers, protect_first, protect_last)]
    if requested > len(candidates):
        raise SettingError(f"select_layers: {requested} layers requested but only {len(candidates)} are unprotected "
                           f"(protect_first={protect_first}, protect_last={protect_last})")
    chosen = sorted(sorted(candidates, key=lambda i: (arr[i], i))[:requested])
    plan = PruningPlan(layers=chosen)
    plan.validate(model)
    return _attach(plan, [{"kind": "select_layers", "unit": "layers", "budget": "structures",
                           "requested": requested, "achieved": requested,
                           "achieved_parameters": parameters_removed(model, plan),
                           "rule": "exact"}])


def select_span(start: int, n: int, *, model: nn.Module | None = None) -> PruningPlan:
    """Remove the contiguous blocks ``start .. start + n - 1`` (validated when ``model`` is given)."""
    _check_int("start", start, 0)
    _check_int("n", n, 1)
    if model is not None:
        n_layers = len(adapter_for(model).blocks(model))
        if start + n > n_layers:
            raise SettingError(f"start + n = {start + n} but the model has {n_layers} layers")
        if n >= n_layers:
            raise SettingError(f"n={n} would remove all {n_layers} layers; at least one must stay")
    plan = PruningPlan(layers=list(range(start, start + n)))
    if model is not None:
        plan.validate(model)
    return _attach(plan, [{"kind": "select_span", "unit": "layers", "budget": "structures",
                           "requested": n, "achieved": n, "rule": "exact"}])


# ---- scales --------------------------------------------------------------------------------------
def layer_normalised(scores):
    """Each layer's scores divided by that layer's median: the same order within a layer, one scale across.

    Raw Wanda, Taylor or magnitude scores carry each layer's activation or weight scale, so a
    global ranking of them mostly ranks *layers* (the trap notebook 05 shows: early layers
    stripped bare, late ones left whole). After division a score reads "this many times as
    important as a typical unit of its layer". Takes a list of per-layer vectors or a NaN-padded
    ``[L, N]`` tensor and returns the same shape.
    """
    padded = not isinstance(scores, (list, tuple))
    rows = list(torch.as_tensor(scores)) if padded else [torch.as_tensor(s) for s in scores]
    out = []
    for i, row in enumerate(rows):
        row = row.to(torch.float64)
        values = row[~torch.isnan(row)]
        median = values.median() if values.numel() else torch.tensor(float("nan"))
        if not bool(median > 0):
            raise SettingError(f"scores: layer {i} has median score {float(median)}, not positive; "
                               "cannot normalise by it")
        out.append((row / median).float())
    return torch.stack(out) if padded else out


# ---- merging -----------------------------------------------------------------------------------
def merge_plans(*plans: PruningPlan, model: nn.Module | None = None) -> PruningPlan:
    """Union of plans: a structure removed by any plan is removed.

    Conflicts are resolved so that the bigger removal wins: heads, KV groups and neurons of a
    layer that some plan removes whole are dropped; with ``model`` given, query heads whose KV
    group is removed whole are dropped too (the group takes them). Then, with ``model`` given, the
    merged plan is validated (e.g. two head plans whose union leaves unequal KV groups raise).
    """
    if not all(isinstance(p, PruningPlan) for p in plans):
        raise SettingError("merge_plans takes PruningPlan arguments only")
    layers = sorted({i for p in plans for i in p.layers})
    gone = set(layers)

    def union(name: str) -> dict[int, list[int]]:
        out: dict[int, set[int]] = {}
        for p in plans:
            for layer, idx in getattr(p, name).items():
                if layer not in gone and idx:
                    out.setdefault(layer, set()).update(idx)
        return {k: sorted(v) for k, v in sorted(out.items())}

    heads, kv_groups, neurons = union("heads"), union("kv_groups"), union("neurons")
    if model is not None and kv_groups:
        adapter = adapter_for(model)
        blocks = adapter.blocks(model)
        for layer, groups in kv_groups.items():
            if layer in heads and 0 <= layer < len(blocks):
                size = adapter.num_heads(blocks[layer]) // adapter.num_kv_heads(blocks[layer])
                heads[layer] = [h for h in heads[layer] if h // size not in set(groups)]
                if not heads[layer]:
                    del heads[layer]
    plan = PruningPlan(heads=heads, kv_groups=kv_groups, neurons=neurons, layers=layers)
    if model is not None:
        plan.validate(model)
    return _attach(plan, [info for p in plans for info in selection_info(p)])


# ---- summary -----------------------------------------------------------------------------------
def plan_summary(model: nn.Module, plan: PruningPlan) -> list[dict]:
    """One row per layer of the *unpruned* model: shapes and parameters before and after the plan.

    Keys: layer, removed, heads_before, heads_after, kv_before, kv_after, neurons_before,
    neurons_after, params_before, params_after (block parameters; counts match
    ``plan.parameters_removed``). Totals: ``format_summary``.
    """
    plan.validate(model)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    rows = []
    for i, block in enumerate(blocks):
        params = sum(p.numel() for p in block.parameters())
        n_q, n_kv, n_i = adapter.num_heads(block), adapter.num_kv_heads(block), adapter.intermediate_size(block)
        row = {"layer": i, "removed": i in plan.layers, "heads_before": n_q, "kv_before": n_kv,
               "neurons_before": n_i, "params_before": params}
        if row["removed"]:
            row.update(heads_after=0, kv_after=0, neurons_after=0, params_after=0)
        else:
            q, kv = plan.kept_heads(model, i)
            sub = PruningPlan(heads={i: plan.heads.get(i, [])}, kv_groups={i: plan.kv_groups.get(i, [])},
                              neurons={i: plan.neurons.get(i, [])})
            row.update(heads_after=len(q), kv_after=len(kv), neurons_after=n_i - len(plan.neurons.get(i, [])),
                       params_after=params - parameters_removed(model, sub))
        rows.append({k: row[k] for k in _COLUMNS})
    return rows


_COLUMNS = ("layer", "removed", "heads_before", "heads_after", "kv_before", "kv_after",
            "neurons_before", "neurons_after", "params_before", "params_after")
_HEADERS = ("layer", "removed", "heads", "kv", "neurons", "params")


def format_summary(rows: list[dict], plan: PruningPlan | None = None) -> str:
    """A fixed-width text table of ``plan_summary`` rows with a total line.

    With ``plan`` given, the selections recorded on it (requested vs achieved) are appended.
    """
    def cells(r):
        return [str(r["layer"]), "yes" if r["removed"] else "", f"{r['heads_before']} -> {r['heads_after']}",
                f"{r['kv_before']} -> {r['kv_after']}", f"{r['neurons_before']} -> {r['neurons_after']}",
                f"{r['params_before']:,} -> {r['params_after']:,}"]

    total = {"layer": "total", "removed": sum(r["removed"] for r in rows)}
    for key in _COLUMNS[2:]:
        total[key] = sum(r[key] for r in rows)
    body = [cells(r) for r in rows]
    tot = cells(total)
    tot[1] = str(total["removed"])
    table = [list(_HEADERS)] + body + [tot]
    widths = [max(len(row[c]) for row in table) for c in range(len(_HEADERS))]
    fmt = lambda row: "  ".join(cell.rjust(w) for cell, w in zip(row, widths))  # noqa: E731
    lines = [fmt(table[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines += ["  ".join("-" * w for w in widths), fmt(tot)]
    before, after = total["params_before"], total["params_after"]
    if before:
        lines.append(f"block parameters removed: {before - after:,} of {before:,} ({(before - after) / before:.1%})")
    for info in selection_info(plan) if plan is not None else []:
        for row in info.get("layers", []):  # the budget planner says why, per layer
            if row["params"] or row["why"] != "protected":
                lines.append(f"layer {row['layer']:>3}: {row['params']:>10,} parameters, predicted error "
                             f"{row['predicted_error']:.2e} ({row['why']})")
        lines.append(f"{info['kind']}: requested {info['requested']:,} "
                     f"{info['unit'] if info['budget'] == 'structures' else 'parameters'}, "
                     f"achieved {info['achieved']:,} {info['unit']}"
                     + (f" ({info['achieved_parameters']:,} parameters)" if "achieved_parameters" in info else "")
                     + f" [{info['rule']}]")
    return "\n".join(lines)
