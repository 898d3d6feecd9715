"""Layer (block) importance: cheap similarity scores, the remove-one-layer oracle, rank correlation.

``block_influence`` (Men et al. 2024, ShortGPT) and ``span_distance`` (Gromov et al. 2024, "The
Unreasonable Ineffectiveness of the Deeper Layers") compare hidden states **per token**: for every
real (non-padding) token the cosine similarity between the residual stream entering a block (or
span of blocks) and leaving it, turned into a distance, then averaged over all real tokens of all
calibration sequences (token-weighted). Two distances (``metric=``):

* ``"bi"``: block influence ``1 - cos``, in [0, 2];
* ``"angular"``: normalised angular distance ``arccos(cos) / pi``, in [0, 1].

Both are streaming: forward hooks reduce each block's input/output to a running sum the moment the
block has run, so a forward pass holds at most the current block's tensors (``span_distance``: a
rolling buffer of the last ``n`` block inputs), never all layers' hidden states.
``block_influence_stored`` computes the same number the memory-hungry way, from
``output_hidden_states=True``; it exists to show (and test) the difference.

Cosines are computed in float64 so an identity block gives a distance of ~1e-16, not float32 noise.
Only the backbone runs (no LM head, no logits).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingError
from ..plan import PruningPlan
from ..pruned_modeling import adapter_for
from ..surgery import apply_plan
from ._calibration import (
    LossFn,
    block_input,
    first_tensor,
    forward_base,
    is_causal_lm,
    iterate,
    make_batches,
    model_inputs,
    pad_id,
    per_block,
    resolve_loss_fn,
    scoring_session,
    token_mask,
)

METRICS = ("bi", "angular")
ORACLE_METRICS = ("perplexity", "loss")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise SettingError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def token_distance(x_in: torch.Tensor, x_out: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-token distance ``[B, T]`` (float64) between two ``[B, T, D]`` hidden-state tensors."""
    cos = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return 1.0 - cos if metric == "bi" else torch.arccos(cos) / math.pi


# ----------------------------------------------------------------------------- streaming scores


def block_influence(model: nn.Module, calib, *, metric: str = "bi", batch_size: int = 8,
                    progress: bool = True) -> torch.Tensor:
    """``[L]``: mean per-token distance between each block's input and output (low = removable)."""
    _check_metric(metric)
    return _span_scores(model, calib, 1, metric, batch_size, progress, "block influence")


def span_distance(model: nn.Module, calib, n: int, *, metric: str = "angular", batch_size: int = 8,
                  progress: bool = True) -> torch.Tensor:
    """``[L - n + 1]``: entry ``l`` is the mean per-token distance between the input of block ``l``
    and the output of block ``l + n - 1`` (Gromov et al. use the angular distance, the default).
    Pick the span to drop with :func:`best_span`."""
    _check_metric(metric)
    n_layers = len(adapter_for(model).blocks(model))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_layers:
        raise SettingError(f"n must be an integer in [1, {n_layers}] (the model has {n_layers} blocks), got n={n!r}")
    return _span_scores(model, calib, n, metric, batch_size, progress, f"span distance n={n}")


def best_span(distances: torch.Tensor) -> tuple[int, float]:
    """``(start, value)`` of the smallest span distance (the first one on ties; NaNs skipped)."""
    d = torch.as_tensor(distances, dtype=torch.float64).reshape(-1)
    if d.numel() == 0 or torch.isnan(d).all():
        raise SettingError("distances is empty (or all NaN); compute it with span_distance(model, calib, n)")
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    start = int(torch.argmin(d))
    return start, float(d[start])


def _span_scores(model, calib, n, metric, batch_size, progress, desc) -> torch.Tensor:
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    batches = make_batches(calib, batch_size, pad_id(model))
    n_spans = len(blocks) - n + 1
    sums = torch.zeros(n_spans, dtype=torch.float64)
    buffer: deque = deque(maxlen=n)  # inputs of the last n blocks run in this forward pass
    state: dict = {}

    def pre_hook(module, args, kwargs):
        buffer.append(block_input(args, kwargs))

    def make_hook(layer):
        def hook(module, args, kwargs, output):
            if layer >= n - 1:  # buffer[0] is the input of block layer - n + 1
                dist = token_distance(buffer[0], first_tensor(output), metric)
                sums[layer - n + 1] += dist[state["mask"]].sum().cpu()

        return hook

    count = 0
    with scoring_session(model) as handles, torch.no_grad():
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(block.register_forward_hook(make_hook(layer), with_kwargs=True))
        try:
            for batch in iterate(batches, model, progress, desc):
                buffer.clear()
                state["mask"] = token_mask(batch)
                count += int(state["mask"].sum())
                forward_base(model, batch)
        finally:
            buffer.clear()
    return (sums / count).float()


def block_influence_stored(model: nn.Module, calib, *, metric: str = "bi", batch_size: int = 8,
                           progress: bool = True) -> torch.Tensor:
    """Same as :func:`block_influence`, from ``output_hidden_states=True`` (holds all L+1 states).

    In transformers 5 the last entry of ``hidden_states`` is the *final-norm* output for
    decoders (``tie_last_hidden_states``), not the last block's raw output; using it would
    compare the last block's input with a normalised vector. So the last block's raw output is
    taken with one forward hook; every other state comes from the stored tuple.
    """
    _check_metric(metric)
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    batches = make_batches(calib, batch_size, pad_id(model))
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    last: dict = {}
    count = 0
    with scoring_session(model) as handles, torch.no_grad():
        handles.append(blocks[-1].register_forward_hook(lambda m, a, o: last.__setitem__("out", first_tensor(o))))
        for batch in iterate(batches, model, progress, "block influence (stored)"):
            mask = token_mask(batch)
            count += int(mask.sum())
            states = list(forward_base(model, batch, output_hidden_states=True).hidden_states)
            states[len(blocks)] = last.pop("out")
            for layer in range(len(blocks)):
                sums[layer] += token_distance(states[layer], states[layer + 1], metric)[mask].sum().cpu()
            del states
    return (sums / count).float()


# ----------------------------------------------------------------------------- oracle


def layer_removal_oracle(
    model: nn.Module,
    calib,
    metric: str | Callable[[nn.Module, object], float] = "perplexity",
    *,
    layers: list[int] | None = None,
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``[L]``: ``metric(model without layer l) - metric(model)`` for every layer ``l``.

    The ground truth the cheap scores are judged against. Each variant is a copy with the layer
    removed by real surgery (``apply_plan(copy, PruningPlan(layers=[l]))``); the copy shares the
    weight tensors (layer removal never writes to them) so no weights are duplicated, and the
    given model is never touched. ``metric``:

    * ``"perplexity"`` (causal LMs): token-weighted perplexity of ``calib``;
    * ``"loss"``: mean of ``loss_fn`` (default as in :func:`head_scores`) over the batches of ``calib``;
    * a callable ``metric(model, calib) -> float`` (e.g. accuracy): it gets the ``calib`` given here.

    For lower-is-better metrics a large positive change means an important layer; for a callable
    like accuracy, the most important layers have the most negative change. ``layers`` limits the
    work to some layers (the others are NaN).
    """
    adapter = adapter_for(model)
    n_layers = len(adapter.blocks(model))
    chosen = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad:
        raise SettingError(f"layers {bad} out of range [0, {n_layers})")
    if n_layers < 2:
        raise SettingError("the model has a single layer; removing it leaves no model to evaluate")
    if callable(metric):
        evaluate = lambda m: float(metric(m, calib))  # noqa: E731
    elif metric in ORACLE_METRICS:
        batches = make_batches(calib, batch_size, pad_id(model))
        if metric == "perplexity":
            if not is_causal_lm(model):
                raise SettingError(f"metric='perplexity' needs a causal LM, {type(model).__name__} is not; "
                                   "use metric='loss' or a callable metric(model, calib) -> float")
            evaluate = lambda m: _perplexity(m, batches)  # noqa: E731
        else:
            fn = resolve_loss_fn(model, loss_fn, batches)
            evaluate = lambda m: _mean_loss(m, batches, fn)  # noqa: E731
    else:
        raise SettingError(f"unknown metric {metric!r}; allowed: {', '.join(ORACLE_METRICS)} or a callable "
                           "metric(model, calib) -> float")
    out = torch.full((n_layers,), float("nan"), dtype=torch.float64)
    with scoring_session(model), torch.no_grad():
        base = evaluate(model)
        for layer in per_block(chosen, progress, "layer removal oracle"):
            variant = _structural_copy(model)
            apply_plan(variant, PruningPlan(layers=[layer]))
            out[layer] = evaluate(variant) - base
            del variant
    return out.float()


def _structural_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the modules and config that *shares* the parameter tensors.

    Removing whole layers only re-links modules (no tensor is sliced or written), so the variant
    can share the weights: copying 30 x 540 MB for SmolLM2 would dominate the oracle's time.
    """
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _perplexity(model: nn.Module, batches) -> float:
    nll, count = 0.0, 0
    for batch in iterate(batches, model, False, "perplexity"):
        logits = model(**model_inputs(model, batch)).logits
        labels = batch["input_ids"].masked_fill(~token_mask(batch), -100)[:, 1:]
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                     ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return math.exp(nll / count)


@torch.no_grad()
def _mean_loss(model: nn.Module, batches, loss_fn) -> float:
    losses = [float(loss_fn(model, batch)) for batch in iterate(batches, model, False, "loss")]
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- comparison


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, tied values sharing the mean of their positions."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    n = x.numel()
    # boundaries of runs of equal values in sorted order
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    positions = torch.arange(1, n + 1, dtype=x.dtype)
    run_sum = torch.zeros(int(run_id[-1]) + 1, dtype=x.dtype).index_add_(0, run_id, positions)
    run_len = torch.zeros_like(run_sum).index_add_(0, run_id, torch.ones_like(positions))
    ranks[order] = (run_sum / run_len)[run_id]
    return ranks


def rank_correlation(a, b) -> float:
    """Spearman rank correlation of two equally long score vectors (ties get averaged ranks).

    Positions where either value is NaN are dropped (so padded ``[L, H_max]`` head scores can be
    compared directly). Returns NaN when fewer than 2 pairs remain or one side is constant.
    """
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if a.numel() != b.numel():
        raise SettingError(f"a and b must have the same number of values, got {a.numel()} and {b.numel()}")
    keep = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[keep], b[keep]
    if a.numel() < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denom == 0:
        return float("nan")
    return float((ra * rb).sum() / denom)
