"""Whole layers (notebook 04): the exercise check, the lesson's flawed score for comparison, and helpers.

Check
    :func:`check_token_distance`: a learner's per-token block influence of one block (mean of
    ``1 - cos`` over the real tokens of a padded batch), judged on synthetic tensors against an
    independent computation, then on SmolLM2's real hidden states against
    ``importance.block_influence``. The usual mistakes (flattening the sequence, forgetting the
    mask, averaging per sequence, cosine along the wrong axis, ...) are recognised and named.
    :func:`check_block_influence_hooks`: a learner's forward hooks that stream the per-token
    angular distance of every block over padded batches, judged against
    ``importance.block_influence(metric="angular")``; names flattening, ``1 - cos``, the missing
    mask, per-sequence or per-batch means, and hooks left on the model.

Helpers
    :func:`flattened_block_influence` computes the lesson's version (one cosine per sequence over
    the flattened ``[T * D]`` vector, padding included) so the notebook can show what goes wrong;
    :func:`block_io` captures the input and output hidden states of some blocks for one small
    batch; :func:`layer_removal_sweep` removes the ``k`` lowest-scored layers from deep copies and
    measures perplexity and size; :func:`naive_remove_layers` removes layers the lesson's way (no
    re-indexing), to show ``generate()`` breaking; :class:`LayerRemovalExplorer` /
    :func:`layer_removal_explorer` is the slider widget (its logic is plain Python, tested headless).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import check
from ..viz import show_in

__all__ = [
    "LayerRemovalExplorer",
    "block_io",
    "cache_indices",
    "check_block_influence_hooks",
    "check_token_distance",
    "flattened_block_influence",
    "layer_removal_explorer",
    "layer_removal_sweep",
    "naive_remove_layers",
    "padded_batch",
    "reference_token_distance",
]


# ----------------------------------------------------------------------------- scores


def reference_token_distance(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> float:
    """The right answer, written independently of the library: mean ``1 - cos`` over real tokens."""
    a, b = x_in.double(), x_out.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    keep = mask.bool()
    return float((1.0 - cos.clamp(-1, 1))[keep].sum() / keep.sum())


def _flattened(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``[B]``: the lesson's distance, one cosine per sequence over its flattened ``[T * D]`` states."""
    return 1.0 - F.cosine_similarity(x_in.double().flatten(1), x_out.double().flatten(1), dim=1)


@torch.no_grad()
def flattened_block_influence(model: nn.Module, calib, *, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """``[L]``: the lesson's block influence, kept to show its flaw (do not prune with it).

    For each sequence the whole ``[T, D]`` hidden state is flattened into one vector of ``T * D``
    numbers, one cosine is taken between the block's flattened input and output, and ``1 - cos``
    is averaged over the sequences. Padding positions are included, as in the lesson. One token
    with a huge norm (SmolLM2's first position) then decides the cosine of the whole sequence.
    Streaming, with the same batches as ``importance.block_influence``.
    """
    from ..importance._calibration import (block_input, first_tensor, forward_base, iterate, make_batches, pad_id,
                                           scoring_session)
    from ..pruned_modeling import adapter_for

    blocks = list(adapter_for(model).blocks(model))
    batches = make_batches(calib, batch_size, pad_id(model))
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    current: dict = {}
    count = 0

    def pre_hook(module, args, kwargs):
        current["in"] = block_input(args, kwargs)

    def make_hook(layer):
        def hook(module, args, kwargs, output):
            sums[layer] += _flattened(current.pop("in"), first_tensor(output)).sum().cpu()

        return hook

    with scoring_session(model) as handles:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(block.register_forward_hook(make_hook(layer), with_kwargs=True))
        for batch in iterate(batches, model, progress, "flattened block influence"):
            count += batch["input_ids"].shape[0]
            forward_base(model, batch)
    return (sums / count).float()


def padded_batch(ids: torch.Tensor, lengths: Sequence[int]) -> list[dict]:
    """Calibration dicts: row ``i`` of ``ids`` cut to ``lengths[i]`` tokens (batched, they get padded)."""
    check(len(lengths) <= ids.shape[0], f"{len(lengths)} lengths but only {ids.shape[0]} rows of ids")
    return [{"input_ids": ids[i, :n]} for i, n in enumerate(lengths)]


@torch.no_grad()
def block_io(model: nn.Module, calib, layers: Sequence[int] | None = None) -> tuple[dict, torch.Tensor]:
    """``({layer: (x_in, x_out)}, mask)`` for ONE batch (all of ``calib``): small batches only.

    ``x_in`` / ``x_out`` are the ``[B, T, D]`` hidden states entering and leaving block ``layer``
    (the raw residual stream, before any final norm); ``mask`` ``[B, T]`` marks the real tokens.
    """
    from ..importance._calibration import (block_input, first_tensor, forward_base, make_batches, pad_id,
                                           scoring_session, token_mask)
    from ..pruned_modeling import adapter_for

    blocks = list(adapter_for(model).blocks(model))
    layers = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    batches = make_batches(calib, 10**9, pad_id(model))
    (batch,) = batches
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    states: dict[int, list] = {i: [None, None] for i in layers}

    def make_hooks(layer):
        def pre(module, args, kwargs):
            states[layer][0] = block_input(args, kwargs).detach().cpu()

        def post(module, args, kwargs, output):
            states[layer][1] = first_tensor(output).detach().cpu()

        return pre, post

    with scoring_session(model) as handles:
        for layer in layers:
            pre, post = make_hooks(layer)
            handles.append(blocks[layer].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(blocks[layer].register_forward_hook(post, with_kwargs=True))
        forward_base(model, batch)
    return {i: (s[0], s[1]) for i, s in states.items()}, token_mask(batch).cpu()


# ----------------------------------------------------------------------------- exercise


def _variants(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    a, b, keep = x_in.double(), x_out.double(), mask.bool()
    cos = F.cosine_similarity(a, b, dim=-1)
    dist = 1.0 - cos
    per_seq = torch.stack([dist[i][keep[i]].mean() for i in range(a.shape[0])])
    masked_in, masked_out = a * keep[..., None], b * keep[..., None]
    return {
        "right": reference_token_distance(x_in, x_out, mask),
        "flattened": float(_flattened(a, b).mean()),
        "flattened, padding masked": float(_flattened(masked_in, masked_out).mean()),
        "no mask": float(dist.mean()),
        "per-sequence means": float(per_seq.mean()),
        "cosine": float(cos[keep].mean()),
        "angular": float((torch.arccos(cos.clamp(-1, 1)) / math.pi)[keep].mean()),
        "masked sum": float(dist[keep].sum()),
        "padding zeroed, all tokens averaged": float((dist * keep).sum() / dist.numel()),
    }


_HINTS = {
    "flattened": "you flattened each sequence into one [T * D] vector and took one cosine per sequence (the "
                 "lesson's version): the score must compare each token's input and output vectors separately "
                 "(cosine over the last dimension, D), then average over the real tokens",
    "flattened, padding masked": "you masked the padding but still flattened each sequence into one [T * D] vector: "
                                 "take one cosine PER TOKEN (over the hidden dimension D), then average them",
    "no mask": "you averaged over every position, padding included: keep only the tokens where mask is True",
    "per-sequence means": "you averaged each sequence first and then the sequences: a short sequence then weighs as "
                          "much as a long one. Average over all real tokens at once (token-weighted)",
    "cosine": "you returned the mean cosine similarity; block influence is the distance 1 - cos",
    "angular": "you returned the angular distance arccos(cos) / pi; this exercise asks for block influence, 1 - cos",
    "masked sum": "you summed the per-token distances; divide by the number of real tokens to get the mean",
    "padding zeroed, all tokens averaged": "you zeroed the padding but divided by ALL positions (B * T): divide by "
                                           "the number of real tokens, mask.sum()",
}


def _as_float(value, where: str, x: torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        b, t, d = x.shape
        if value.numel() != 1:
            hint = "average the per-token distances over the real tokens (mask True) to one number"
            if shape == (b, t):
                hint = "that is one value per token (right so far): now average them over the real tokens (mask True)"
            elif shape == (b, d):
                hint = ("[B, D] means the cosine was taken along dim=1, the SEQUENCE axis; take it along the hidden "
                        "dimension (dim=-1), which gives one value per token, then average over the real tokens")
            elif shape == (b,):
                hint = "that is one value per sequence: average over all real tokens at once, not per sequence"
            check(False, f"{where}: shape {shape} but expected a scalar: {hint}")
        value = value.item()
    check(isinstance(value, (int, float)), f"{where}: return a float (or a 0-d tensor), got {type(value).__name__}")
    check(math.isfinite(value), f"{where}: the result is {value}; a division by zero or a NaN from padding?")
    return float(value)


def _judge(got: float, x_in, x_out, mask, where: str) -> None:
    variants = _variants(x_in, x_out, mask)
    right = variants["right"]
    if math.isclose(got, right, rel_tol=1e-4, abs_tol=1e-7):
        return
    for name, value in variants.items():
        if name != "right" and math.isclose(got, value, rel_tol=1e-4, abs_tol=1e-7):
            check(False, f"{where}: got {got:.6f} but expected {right:.6f}: {_HINTS[name]}")
    check(False, f"{where}: got {got:.6f} but expected {right:.6f}. For each real token t: "
                 "d_t = 1 - <x_t, y_t> / (|x_t| |y_t|); the answer is the mean of d_t over the tokens with mask True")


def _synthetic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three sequences of 9, 5 and 2 real tokens (then padding with other vectors), D = 16.

    Token 0 of each sequence has a large norm, as in real decoders; the padding is unrelated
    noise, so every mistake in the hints gives a different number.
    """
    g = torch.Generator().manual_seed(seed)
    b, t, d = 3, 9, 16
    x_in = torch.randn(b, t, d, generator=g)
    x_in[:, 0] *= 20.0
    x_out = x_in + 0.6 * torch.randn(b, t, d, generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate((9, 5, 2)):
        mask[i, :n] = True
    x_out = torch.where(mask[..., None], x_out, torch.randn(b, t, d, generator=g))
    return x_in, x_out, mask


def check_token_distance(fn: Callable, model: nn.Module | None = None, calib: torch.Tensor | None = None,
                         layers: Sequence[int] = (3, 14, 28), lengths: Sequence[int] = (48, 30, 12)) -> dict:
    """Check ``fn(x_in, x_out, mask) -> float``: mean per-token ``1 - cos`` over the real tokens.

    First on synthetic tensors (padding and a large-norm first token), then, when ``model`` and
    ``calib`` (``[N, T]`` token ids, ``N >= len(lengths)``) are given, on the model's real hidden
    states for a padded batch, against ``importance.block_influence`` of the same batch at
    ``layers``. Returns ``{layer: value}`` of the learner's function on the real states.
    """
    for seed, where in ((0, "synthetic batch"), (1, "second synthetic batch")):
        x_in, x_out, mask = _synthetic(seed)
        got = _as_float(fn(x_in.clone(), x_out.clone(), mask.clone()), where, x_in)
        _judge(got, x_in, x_out, mask, where)
    x_in, x_out, mask = _synthetic(0)
    same = _as_float(fn(x_in.clone(), x_in.clone(), mask.clone()), "identical input and output", x_in)
    check(abs(same) < 1e-6, f"identical input and output must give 0, got {same:.3g}")
    out: dict[int, float] = {}
    if model is not None:
        from ..importance import block_influence

        check(calib is not None, "pass calib (token ids [N, T]) together with the model")
        from ..pruned_modeling import adapter_for

        n_layers = len(adapter_for(model).blocks(model))
        layers = [i for i in layers if 0 <= i < n_layers] or [0]
        lengths = [min(int(n), calib.shape[1]) for n in lengths]
        batch = padded_batch(calib, lengths)
        reference = block_influence(model, batch, batch_size=len(batch), progress=False)
        states, real = block_io(model, batch, layers)
        for layer in layers:
            a, b = states[layer]
            check(math.isclose(reference_token_distance(a, b, real), float(reference[layer]), rel_tol=1e-4,
                               abs_tol=1e-6),
                  f"internal: the check's own distance disagrees with importance.block_influence at layer {layer}")
            where = f"layer {layer} of the model (padded batch of lengths {list(lengths)})"
            got = _as_float(fn(a.clone(), b.clone(), real.clone()), where, a)
            _judge(got, a, b, real, where)
            out[layer] = got
    print("check_token_distance: correct on synthetic tensors"
          + (f" and on real hidden states of layers {sorted(out)} (matches importance.block_influence)" if out else ""))
    return out


# ----------------------------------------------------------------------------- exercise: hooks


def _hook_count(model: nn.Module) -> dict[int, tuple[set, set]]:
    """``{id(module): (forward hook ids, forward pre-hook ids)}`` for every module of ``model``."""
    return {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}


def _remove_new_hooks(model: nn.Module, before: dict) -> int:
    """Remove the forward (pre-)hooks registered since ``before``; return how many there were."""
    removed = 0
    for m in model.modules():
        old_post, old_pre = before.get(id(m), (set(), set()))
        for hooks, old, extras in ((m._forward_hooks, old_post, (m._forward_hooks_with_kwargs,
                                                                 m._forward_hooks_always_called)),
                                   (m._forward_pre_hooks, old_pre, (m._forward_pre_hooks_with_kwargs,))):
            for key in [k for k in hooks if k not in old]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)
                removed += 1
    return removed


def _hook_variants(states: list[tuple[dict, torch.Tensor]], n_layers: int) -> dict[str, torch.Tensor]:
    """``{name: [L]}``: the right angular block influence of some batches and the usual wrong ones.

    ``states``: per batch, ``block_io``'s ``({layer: (x_in, x_out)}, mask)``.
    """
    out: dict[str, list[float]] = {}

    def add(name, value):
        out.setdefault(name, []).append(float(value))

    for layer in range(n_layers):
        angular, bi, every, per_seq, per_batch, flat_ang, flat_bi = [], [], [], [], [], [], []
        for io, mask in states:
            a, b = (t.double() for t in io[layer])
            cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            ang = torch.arccos(cos) / math.pi
            keep = mask.bool()
            angular.append(ang[keep]), bi.append((1 - cos)[keep]), every.append(ang.reshape(-1))
            per_seq += [ang[i][keep[i]].mean() for i in range(a.shape[0])]
            per_batch.append(ang[keep].mean())
            flat = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).clamp(-1, 1)
            flat_ang.append(torch.arccos(flat) / math.pi), flat_bi.append(1 - flat)
        add("right", torch.cat(angular).mean())
        add("1 - cos", torch.cat(bi).mean())
        add("no mask", torch.cat(every).mean())
        add("per-sequence means", torch.stack(per_seq).mean())
        add("per-batch means", torch.stack(per_batch).mean())
        add("flattened", torch.cat(flat_ang).mean())
        add("flattened, 1 - cos", torch.cat(flat_bi).mean())
        add("sum", torch.cat(angular).sum())
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}


_HOOK_HINTS = {
    "1 - cos": "you computed 1 - cos (ShortGPT's block influence, exercise 1); this exercise asks for the "
               "angular distance arccos(cos) / pi, the distance of Gromov et al. (section 3)",
    "no mask": "you averaged over every position, padding included: keep only the tokens where the batch's "
               "attention_mask is 1, and divide by their number",
    "per-sequence means": "you averaged each sequence first and then the sequences: average over all real tokens "
                          "of all batches at once (a running sum and a running token count)",
    "per-batch means": "you averaged each batch and then the batches: keep one running sum per block and one "
                       "running count of real tokens over ALL batches, and divide once at the end",
    "flattened": "you flattened each sequence into one [T * D] vector (the lesson's flaw, section 2): take one "
                 "cosine per TOKEN, over the hidden dimension (dim=-1)",
    "flattened, 1 - cos": "you flattened each sequence into one [T * D] vector and took 1 - cos: that is the "
                          "lesson's score exactly (section 2). Take one angular distance per TOKEN, over dim=-1",
    "sum": "you returned the sums: divide each block's sum by the number of real tokens",
}


def check_block_influence_hooks(fn: Callable, model: nn.Module, calib: torch.Tensor,
                                lengths: Sequence[int] = (32, 20, 8), batch_size: int = 2) -> torch.Tensor:
    """Check ``fn(model, batches) -> [L]``: per block, the mean over ALL real tokens of the angular
    distance ``arccos(cos(x_t, y_t)) / pi`` between the hidden vectors entering and leaving it.

    ``batches`` are padded dicts (``input_ids``, ``attention_mask``) cut from ``calib`` (``[N, T]``
    token ids, ``N >= len(lengths)``) at ``lengths``, ``batch_size`` rows each, so the answer needs
    the mask and a token-weighted mean across batches. The reference is
    ``importance.block_influence(model, ..., metric="angular")`` on the same rows; the check also
    verifies that ``fn`` left no hook on the model (and removes any it left). Returns ``fn``'s scores.
    """
    from ..importance import block_influence, make_batches
    from ..importance._calibration import pad_id
    from ..pruned_modeling import adapter_for

    check(calib.dim() == 2 and calib.shape[0] >= len(lengths),
          f"calib must be token ids [N, T] with N >= {len(lengths)} (one row per length), got {tuple(calib.shape)}")
    n_layers = len(adapter_for(model).blocks(model))
    rows = padded_batch(calib, [min(int(n), calib.shape[1]) for n in lengths])
    batches = make_batches(rows, batch_size, pad_id(model))
    before = _hook_count(model)
    got = fn(model, [dict(b) for b in batches])
    left = _remove_new_hooks(model, before)
    check(left == 0, f"{left} hook(s) were still registered on the model after your function returned (the check "
                     "removed them): keep the handles that register_forward_hook returns and call handle.remove() "
                     "on each, in a finally block so that an error inside the loop removes them too")
    check(isinstance(got, torch.Tensor), f"return a tensor of {n_layers} values (one per block), got "
                                         f"{type(got).__name__}")
    check(got.numel() == n_layers, f"got shape {tuple(got.shape)}; expected [{n_layers}]: one mean distance per "
                                   "block, each averaged over the real tokens of all batches")
    got = got.detach().double().reshape(-1)
    check(bool(torch.isfinite(got).all()), "some values are NaN or infinite: a division by zero tokens, or arccos of "
                                           "a cosine a little above 1 (clamp it to [-1, 1])")
    starts = range(0, len(rows), batch_size)
    variants = _hook_variants([block_io(model, rows[s:s + batch_size]) for s in starts], n_layers)
    reference = block_influence(model, rows, metric="angular", batch_size=batch_size, progress=False).double()
    check(torch.allclose(variants["right"], reference, rtol=1e-4, atol=1e-6),
          "internal: the check's own angular distances disagree with importance.block_influence")

    def matches(values):
        return torch.allclose(got, values, rtol=1e-4, atol=1e-6)

    if not matches(variants["right"]):
        for name, values in variants.items():
            if name != "right" and matches(values):
                check(False, f"got {got[:3].tolist()} ... for blocks 0-2 but expected {variants['right'][:3].tolist()} "
                             f"...: {_HOOK_HINTS[name]}")
        worst = int((got - variants["right"]).abs().argmax())
        check(False, f"block {worst}: got {float(got[worst]):.6f} but expected {float(variants['right'][worst]):.6f}. "
                     "For every real token t of every batch: d_t = arccos(<x_t, y_t> / (|x_t| |y_t|)) / pi, with x_t "
                     "the block's input (the hidden_states it is called with) and y_t its output (the first "
                     "element if it returns a tuple); the score is the sum of d_t over all batches divided by the "
                     "number of real tokens")
    print(f"check_block_influence_hooks: correct on {len(rows)} padded windows in {len(batches)} batches, all "
          f"{n_layers} blocks (matches importance.block_influence(metric='angular')); no hook left behind")
    return got.float()


# ----------------------------------------------------------------------------- removal


@dataclass
class RemovalRow:
    k: int
    layers: list[int]
    params: int
    perplexity: float


def layer_removal_sweep(model: nn.Module, scores, ks: Sequence[int], ids: torch.Tensor, *, context: int,
                        stride: int, protect_first: int = 0, protect_last: int = 0,
                        keep: Sequence[int] = ()) -> tuple[list[RemovalRow], dict[int, nn.Module]]:
    """For each ``k``: remove the ``k`` lowest-scored layers (``select_layers``) from a deep copy,
    measure ``evaluate.perplexity`` on ``ids`` and the parameter count. ``model`` is not changed.

    Returns the rows and the pruned copies for the ``k`` listed in ``keep`` (the others are freed).
    """
    from ..evaluate import count_parameters, perplexity
    from ..selection import select_layers
    from ..surgery import apply_plan

    rows, kept = [], {}
    for k in ks:
        plan = select_layers(model, scores, count=int(k), protect_first=protect_first, protect_last=protect_last)
        pruned = model if k == 0 else apply_plan(copy.deepcopy(model), plan)
        ppl = perplexity(pruned, ids, context=context, stride=stride)
        rows.append(RemovalRow(int(k), list(plan.layers), count_parameters(pruned), ppl))
        if k in keep:
            kept[int(k)] = pruned
        del pruned
    return rows, kept


def naive_remove_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """The lesson's layer removal, on a copy: delete the blocks and lower ``num_hidden_layers``.

    Nothing is re-indexed: each remaining attention module keeps its old ``layer_idx`` (its KV
    cache slot), so ``generate()`` with a cache indexes slots that no longer exist. The copy
    shares the weight tensors with ``model`` (nothing is written to them).
    """
    from ..pruned_modeling import adapter_for

    naive = copy.deepcopy(model, {id(p): p for p in model.parameters()})
    blocks = adapter_for(naive).blocks(naive)
    for i in sorted(set(int(i) for i in layers), reverse=True):
        del blocks[i]
    naive.config.num_hidden_layers = len(blocks)
    return naive


def cache_indices(model: nn.Module) -> list:
    """Each block's attention ``layer_idx`` (the KV-cache slot it reads and writes)."""
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(model)
    return [getattr(adapter.attention(b), "layer_idx", None) for b in adapter.blocks(model)]


# ----------------------------------------------------------------------------- widget


@dataclass
class LayerChoice:
    """What one widget position computed."""

    score: str
    k: int
    layers: list[int]
    params_removed: int
    share_removed: float  # of all parameters of the model
    measured: float | None  # a measurement made in the notebook for this (score, k), if any
    values: list[float] = field(repr=False, default_factory=list)


class LayerRemovalExplorer:
    """Controller of the layer-removal widget; plain Python, usable (and tested) without a browser.

    ``scores``: ``{name: [L] tensor}`` where LOW means removable (block influence, span-free
    distances, an oracle's perplexity increase). For a score and a ``k`` it selects the ``k``
    lowest-scored layers with ``select_layers`` and reports the parameters removed
    (``surgery.parameters_removed``). ``measured``: ``{(score name, k): value}`` of measurements
    made elsewhere (e.g. perplexity), shown when the widget lands on one. Nothing is pruned here.
    """

    def __init__(self, model: nn.Module, scores: dict, *, measured: dict | None = None,
                 measured_label: str = "perplexity", max_k: int | None = None, protect_first: int = 0,
                 protect_last: int = 0, draw: bool = True):
        import ipywidgets as widgets

        from ..evaluate import count_parameters
        from ..pruned_modeling import adapter_for

        check(len(scores) > 0, "scores is empty: pass {name: [L] tensor}")
        self.model = model
        self.n_layers = len(adapter_for(model).blocks(model))
        self.scores = {name: torch.as_tensor(s, dtype=torch.float64).reshape(-1) for name, s in scores.items()}
        for name, s in self.scores.items():
            check(s.numel() == self.n_layers, f"scores[{name!r}] has {s.numel()} values but the model has "
                                              f"{self.n_layers} layers")
        self.measured = dict(measured or {})
        self.measured_label = measured_label
        self.protect_first, self.protect_last = protect_first, protect_last
        self.total_params = count_parameters(model)
        self.draw = draw
        self.figure = None
        max_k = max_k if max_k is not None else self.n_layers // 2
        self.dropdown = widgets.Dropdown(options=list(self.scores), description="score")
        self.slider = widgets.IntSlider(value=0, min=0, max=max_k, description="layers removed",
                                        continuous_update=False, style={"description_width": "initial"})
        self.label = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.dropdown, self.slider]), self.label, self.output])
        self.current: LayerChoice | None = None
        self.dropdown.observe(self._on_change, names="value")
        self.slider.observe(self._on_change, names="value")
        self.update(self.dropdown.value, self.slider.value)

    def choose(self, score: str, k: int) -> LayerChoice:
        from ..selection import select_layers
        from ..surgery import parameters_removed

        values = self.scores[score]
        plan = select_layers(self.model, values.float(), count=int(k), protect_first=self.protect_first,
                             protect_last=self.protect_last)
        removed = parameters_removed(self.model, plan)
        return LayerChoice(score, int(k), list(plan.layers), removed, removed / self.total_params,
                           self.measured.get((score, int(k))), values.tolist())

    def update(self, score: str, k: int) -> LayerChoice:
        self.current = self.choose(score, k)
        c = self.current
        text = (f"{c.score}: remove {c.k} layer(s) {c.layers}<br>"
                f"{c.params_removed:,} parameters removed ({c.share_removed:.1%} of the model)")
        if c.measured is not None:
            text += f"<br>measured {self.measured_label}: {c.measured:.2f}"
        self.label.value = text
        if self.draw:
            self._redraw()
        return c

    def _on_change(self, change) -> None:
        self.update(self.dropdown.value, self.slider.value)

    def _redraw(self) -> None:
        import matplotlib.pyplot as plt
        c = self.current
        fig, ax = plt.subplots(figsize=(7, 2.8))
        colors = ["tab:red" if i in c.layers else "tab:blue" for i in range(self.n_layers)]
        ax.bar(range(self.n_layers), c.values, color=colors)
        ax.set(xlabel="layer", ylabel=c.score, title=f"{c.k} lowest removed (red)")
        self.figure = show_in(self.output, fig)


def layer_removal_explorer(model: nn.Module, scores: dict, **kwargs):
    """``(widget, explorer)``: display ``widget``; drive or inspect ``explorer`` from code."""
    explorer = LayerRemovalExplorer(model, scores, **kwargs)
    return explorer.widget, explorer
