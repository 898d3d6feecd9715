"""Attention heads (notebooks 02 and 03): exercise checks and small teaching helpers.

Checks
    :func:`check_head_magnitudes` (02): weight-magnitude head scores of one layer, judged against
    ``importance.head_scores(model, method="magnitude")`` and an independent slice-by-slice
    computation written here.
    :func:`check_heads_parameters` (03): the parameters a head plan removes from an MHA encoder,
    judged against ``surgery.parameters_removed`` and against real surgery on a copy.
    :func:`check_head_surgery` (03): a learner's surgery on one BERT layer (slice the rows of Q,
    K, V and the input columns of O for a list of heads), judged weight by weight and output by
    output against ``surgery.apply_plan`` on a copy.
    :func:`check_head_selection` (03): a learner's global selection of the lowest-scored heads
    with protected first/last layers and a per-layer minimum, judged against
    ``selection.select_heads(..., multiple=1)``.

Helpers
    :func:`taylor_by_part` splits each head's first-order Taylor score into its Q, K, V and O
    shares (what a Q-only score, like the lesson's, leaves out);
    :func:`head_removal_oracle` removes single heads by real surgery on copies and measures the
    change of a metric: the ground truth the cheap scores are judged against;
    :func:`classifier_loss_accuracy` is that metric for a sequence classifier, and
    :func:`sentiment_batches` the labelled batches it (and the calibration) reads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import check

PARTS = ("q", "k", "v", "o")


# ----------------------------------------------------------------------------- helpers


def _linears(model: nn.Module, layer: int):
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[layer]
    q, k, v = adapter.qkv(block)
    return adapter, block, q, k, v, adapter.o_proj(block)


def _rows_sq(linear: nn.Linear, n: int, d: int, bias: bool = True) -> torch.Tensor:
    """Squared L2 norm of each head's ``d`` output rows (and bias entries) of ``linear``."""
    w = linear.weight.detach().double()
    total = (w.reshape(n, d, -1) ** 2).sum((1, 2))
    if bias and linear.bias is not None:
        total = total + (linear.bias.detach().double().reshape(n, d) ** 2).sum(1)
    return total


def _cols_sq(linear: nn.Linear, n: int, d: int) -> torch.Tensor:
    """Squared L2 norm of each head's ``d`` input columns of ``linear`` (the O projection)."""
    w = linear.weight.detach().double()
    return (w.reshape(w.shape[0], n, d) ** 2).sum((0, 2))


def _magnitude_variants(q, k, v, o, n: int, d: int) -> dict[str, torch.Tensor]:
    """The right answer and the usual wrong ones, for an MHA layer (n query heads = n KV heads)."""
    qs, ks, vs, os_ = _rows_sq(q, n, d), _rows_sq(k, n, d), _rows_sq(v, n, d), _cols_sq(o, n, d)
    qs_nb, ks_nb, vs_nb = _rows_sq(q, n, d, False), _rows_sq(k, n, d, False), _rows_sq(v, n, d, False)
    o_rows = _rows_sq(o, n, d, bias=False) if o.weight.shape[0] == n * d else None
    right = qs + ks + vs + os_
    variants = {
        "right": right.sqrt(),
        "squared": right,
        "query only": qs.sqrt(),
        "query rows only, no bias": qs_nb.sqrt(),
        "no O": (qs + ks + vs).sqrt(),
        "no biases": (qs_nb + ks_nb + vs_nb + os_).sqrt(),
        "per-part norms summed": qs.sqrt() + ks.sqrt() + vs.sqrt() + os_.sqrt(),
    }
    if o_rows is not None:
        variants["O rows"] = (qs + ks + vs + o_rows).sqrt()
    return variants


_HINTS = {
    "squared": "your scores are the squared norms: take the square root of the sum of squares",
    "query only": "you scored only the query rows (the lesson's version): a head also owns its rows of K and V "
                  "and its input columns of O",
    "query rows only, no bias": "you scored only the query weight rows: a head also owns its q/k/v biases, its rows "
                                "of K and V and its input columns of O",
    "no O": "O is missing: the head's output goes through O's input columns h*d:(h+1)*d (o.weight[:, h*d:(h+1)*d])",
    "no biases": "the q, k and v biases are missing: each head owns bias entries h*d:(h+1)*d of each of them",
    "per-part norms summed": "you added four separate norms; the score is one L2 norm over all of the head's "
                             "parameters: sqrt(|Q_h|^2 + |K_h|^2 + |V_h|^2 + |O_h|^2)",
    "O rows": "you took rows of O; a head's slice of O is its input COLUMNS o.weight[:, h*d:(h+1)*d] "
              "(O maps the concatenated head outputs back to the hidden size)",
}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- 02: magnitude


def check_head_magnitudes(fn: Callable, model: nn.Module, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Check ``fn(q, k, v, o, head_dim) -> Tensor[H]`` on every layer (or ``layers``) of an MHA model.

    ``q``, ``k``, ``v``, ``o`` are the layer's ``nn.Linear`` projections. Returns the ``[L, H]``
    scores the function produced (for plotting) when they are right.
    """
    from ..importance import head_scores

    adapter = _linears(model, 0)[0]
    head_dim = adapter.head_dim(model)
    reference = head_scores(model, method="magnitude", progress=False)
    n_layers = reference.shape[0]
    layers = list(range(n_layers)) if layers is None else list(layers)
    rows = []
    for layer in layers:
        _, block, q, k, v, o = _linears(model, layer)
        n, n_kv = adapter.num_heads(block), adapter.num_kv_heads(block)
        check(n == n_kv, f"layer {layer} has {n} query heads but {n_kv} KV heads: this exercise is for MHA "
                         "models (one K/V head per query head), such as MiniLM")
        with torch.no_grad():
            got = fn(q, k, v, o, head_dim)
        check(isinstance(got, torch.Tensor), f"layer {layer}: return a torch.Tensor, got {type(got).__name__}")
        got = got.detach().reshape(-1) if got.dim() > 1 and got.numel() == n else got.detach()
        check(tuple(got.shape) == (n,),
              f"layer {layer}: shape {tuple(got.shape)} but expected ({n},): one score per head "
              f"(the layer has {n} heads of head_dim {head_dim})")
        check(bool(torch.isfinite(got).all()), f"layer {layer}: the scores hold NaN or inf")
        variants = _magnitude_variants(q, k, v, o, n, head_dim)
        # the independent computation must agree with the library before the learner is judged
        check(_close(variants["right"], reference[layer, :n]),
              f"internal: the library's magnitude scores disagree with the check's own computation at layer {layer}")
        if not _close(got, variants["right"]):
            for name, value in variants.items():
                if name != "right" and _close(got, value):
                    check(False, f"layer {layer}: {_HINTS[name]}")
            bad = int((got.double() - variants["right"]).abs().argmax())
            check(False, f"layer {layer}, head {bad}: got {float(got[bad]):.5f} but expected "
                         f"{float(variants['right'][bad]):.5f}. A head h owns rows h*d:(h+1)*d of q, k and v (weights "
                         f"and biases) and columns h*d:(h+1)*d of o.weight (d = head_dim = {head_dim})")
        rows.append(got.float())
    print(f"check_head_magnitudes: all {len(layers)} layers match importance.head_scores(..., 'magnitude')")
    return torch.stack(rows)


# ----------------------------------------------------------------------------- 03: parameters


def check_heads_parameters(fn: Callable, model: nn.Module, plan) -> int:
    """Check ``fn(plan, hidden_size, head_dim) -> int``: parameters removed by a heads-only plan
    on an MHA encoder with biases (BERT family). Compared with ``surgery.parameters_removed`` and
    with the parameter count of a copy pruned by real surgery. Returns the right count."""
    from ..evaluate import count_parameters
    from ..surgery import apply_plan, parameters_removed

    check(not plan.layers and not plan.neurons and not plan.kv_groups,
          "this exercise counts a heads-only plan: the plan has layers, neurons or kv_groups")
    adapter, _, q, _, _, o = _linears(model, 0)
    hidden, d = q.in_features, adapter.head_dim(model)
    expected = parameters_removed(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    measured = count_parameters(model) - count_parameters(pruned)
    check(expected == measured, f"internal: parameters_removed ({expected}) differs from surgery ({measured})")
    got = fn(plan, hidden, d)
    check(isinstance(got, (int,)) or (isinstance(got, torch.Tensor) and got.numel() == 1),
          f"return an int, got {type(got).__name__}")
    got = int(got)
    n = sum(len(h) for h in plan.heads.values())
    per_head = expected // n if n else 0
    if got != expected:
        hints = {
            n * d * 4 * hidden: "the biases of q, k and v are missing: each head owns 3 * head_dim bias entries",
            n * d * 3 * (hidden + 1): "O is missing: each head also owns head_dim input columns of O "
                                      "(hidden_size weights each)",
            n * d * (4 * hidden + 4): "you removed O's bias too: O's bias belongs to the whole layer (its output "
                                      "is the hidden size, which does not shrink)",
            n * d * (hidden + 1): "you counted only the query rows: K and V rows and O columns go too",
            n * d * (2 * hidden + 1): "you counted Q and O but not K and V: in an MHA model each query head has "
                                      "its own key and value head, removed with it",
        }
        hint = hints.get(got)
        if hint is None and n and got % n == 0:
            hint = (f"you count {got // n:,} parameters per head but a head holds {per_head:,} "
                    f"= 3 * head_dim * (hidden_size + 1) + head_dim * hidden_size")
        if hint is None:
            hint = (f"the plan removes {n} heads of {per_head:,} parameters each "
                    "(rows of q, k, v with their biases and input columns of o)")
        check(False, f"got {got:,} parameters but the plan removes {expected:,}: {hint}")
    print(f"check_heads_parameters: {got:,} parameters, matching parameters_removed and the surgery")
    return expected


# ----------------------------------------------------------------------------- 03: surgery


def _probe(model: nn.Module, seed: int = 0) -> dict:
    """Two random token sequences (the second padded) for comparing two models' outputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(int(model.config.vocab_size), 1000), (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _diagnose_rows(name: str, got: nn.Linear, ref: nn.Linear, dense: nn.Linear, heads: list[int], n: int,
                   d: int) -> None:
    """Name what is wrong with a learner's Q, K or V projection (output rows per head)."""
    from ..pruned_modeling import head_rows

    kept = n - len(heads)
    wanted = (kept * d, dense.in_features)
    shape = tuple(got.weight.shape)
    check(shape[1] == dense.in_features,
          f"{name}: weight shape {shape}, expected {wanted}: you sliced the columns (inputs) of {name}; a head owns "
          f"head_dim output ROWS of {name} (dim 0 of weight: rows h * head_dim ... (h + 1) * head_dim - 1)")
    check(shape[0] != n * d, f"{name}: still {n * d} output rows: {name} was not sliced")
    check(shape[0] != n * d - len(heads),
          f"{name}: {shape[0]} rows; you removed one row per head, but each head owns head_dim = {d} consecutive rows")
    check(not (shape[0] == len(heads) * d and kept != len(heads)),
          f"{name}: {shape[0]} rows = the listed heads: you kept the heads to remove instead of the others")
    check(shape == wanted, f"{name}: weight shape {shape}, expected {wanted} ({kept} heads of {d} rows)")
    check(got.bias is not None and got.bias.shape == ref.bias.shape,
          f"{name}: bias {None if got.bias is None else tuple(got.bias.shape)}, expected {tuple(ref.bias.shape)}: "
          "the removed rows' bias entries must go too (and the new Linear needs a bias)")
    if not torch.equal(got.weight, ref.weight):
        removed_only = head_rows(torch.tensor(heads), d)
        strided = torch.tensor([h + n * j for h in range(n) if h not in heads for j in range(d)])
        if kept == len(heads) and torch.equal(got.weight, dense.weight[removed_only]):
            check(False, f"{name}: these are the rows of the listed heads: keep the OTHER heads")
        if torch.equal(got.weight, dense.weight[strided]):
            check(False, f"{name}: you took rows h, h + n_heads, h + 2 n_heads, ...; head h owns the CONSECUTIVE rows "
                         "h * head_dim ... (h + 1) * head_dim - 1")
        check(False, f"{name}: the weight has the right shape but not the kept heads' rows in their original order")
    check(torch.equal(got.bias, ref.bias), f"{name}: the weight rows are right but the bias is not: slice the bias "
                                           "with the same row indices")


def check_head_surgery(fn: Callable, model: nn.Module, layer: int, heads: Sequence[int]) -> nn.Module:
    """Check ``fn(block, heads)``: removes the listed heads from one BERT-family block in place.

    A deep copy of ``model`` gets ``fn`` on its block ``layer``, another copy gets
    ``apply_plan(copy, PruningPlan(heads={layer: heads}))``. Q, K, V (rows and biases), O (input
    columns; its bias untouched), the attention module's ``num_attention_heads`` /
    ``all_head_size`` and the outputs on a padded probe batch must be identical. ``model`` is not
    changed. Returns the learner's pruned copy.
    """
    from ..plan import PruningPlan
    from ..surgery import apply_plan

    adapter, block, q, k, v, o = _linears(model, layer)
    check(adapter.name == "bert", f"this exercise prunes a BERT-family encoder; the model is {adapter.name}")
    n, d = adapter.num_heads(block), adapter.head_dim(model)
    heads = sorted(int(h) for h in heads)
    check(heads and len(set(heads)) == len(heads) and all(0 <= h < n for h in heads) and len(heads) < n,
          f"heads must list distinct heads of the layer (0 .. {n - 1}), leaving at least one, got {heads}")
    mine, ref = copy.deepcopy(model), apply_plan(copy.deepcopy(model), PruningPlan(heads={layer: heads}))
    fn(adapter.blocks(mine)[layer], list(heads))
    _, _, *got = _linears(mine, layer)
    _, _, *want = _linears(ref, layer)
    for name, g, r, dense in zip(("query", "key", "value"), got[:3], want[:3], (q, k, v)):
        _diagnose_rows(name, g, r, dense, heads, n, d)
    go, ro = got[3], want[3]
    shape = tuple(go.weight.shape)
    check(shape[0] == o.out_features, f"output dense (O): weight shape {shape}, expected {tuple(ro.weight.shape)}: "
                                      "you sliced O's rows (its outputs, the hidden size); a head owns head_dim input "
                                      "COLUMNS of O (dim 1 of weight)")
    check(shape[1] != n * d, "output dense (O): still all input columns: the removed heads' outputs are gone, so "
                             "their head_dim input columns of O must go too")
    check(shape == tuple(ro.weight.shape), f"output dense (O): weight shape {shape}, expected {tuple(ro.weight.shape)}")
    check(torch.equal(go.weight, ro.weight), "output dense (O): right shape, wrong columns: keep the kept heads' "
                                             "columns h * head_dim ... (h + 1) * head_dim - 1, in order")
    check(go.bias is not None and torch.equal(go.bias, o.bias),
          "output dense (O): its bias must stay exactly as it was (its size is the hidden size, which does not change)")
    attention = adapter.attention(adapter.blocks(mine)[layer])
    kept = n - len(heads)
    check(attention.num_attention_heads == kept and attention.all_head_size == kept * d,
          f"the attention module still says num_attention_heads={attention.num_attention_heads}, "
          f"all_head_size={attention.all_head_size}; after removing {len(heads)} of {n} heads set them to "
          f"{kept} and {kept * d} (save_pretrained and later code read them)")
    for i, (b_mine, b_dense) in enumerate(zip(adapter.blocks(mine), adapter.blocks(model))):
        if i != layer:
            check(all(torch.equal(a, b) for a, b in zip(b_mine.parameters(), b_dense.parameters())),
                  f"layer {i} changed, but only layer {layer} should be pruned")
    probe = _probe(model)
    with torch.no_grad():
        a, b = mine(**probe)[0], ref(**probe)[0]
    check(torch.allclose(a, b, rtol=0, atol=1e-6),
          f"the weights match but the outputs differ by up to {float((a - b).abs().max()):.3g}")
    print(f"check_head_surgery: layer {layer} without heads {heads}: every weight and the outputs equal apply_plan's")
    return mine


# ----------------------------------------------------------------------------- 03: selection


def _normalised_selection(got, where: str) -> dict[int, list[int]]:
    check(isinstance(got, dict), f"{where}: return a dict {{layer: [heads to remove]}}, got {type(got).__name__}")
    out = {}
    for layer, heads in got.items():
        heads = [int(h) for h in (heads.tolist() if isinstance(heads, torch.Tensor) else heads)]
        check(len(set(heads)) == len(heads), f"{where}: layer {layer} lists a head twice: {heads}")
        if heads:
            out[int(layer)] = sorted(heads)
    return out


def _selection_variants(scores: torch.Tensor, count: int, protect_first: int, protect_last: int,
                        min_heads: int) -> dict[str, dict[int, list[int]]]:
    """The usual wrong selections, for naming a learner's mistake."""
    n_layers, n_heads = scores.shape
    protected = set(range(protect_first)) | set(range(n_layers - protect_last, n_layers))
    order = sorted(((float(scores[i, h]), i, h) for i in range(n_layers) for h in range(n_heads)))

    def take(items, skip_protected=True, respect_min=True):
        out: dict[int, list[int]] = {}
        for _, i, h in items:
            if sum(map(len, out.values())) == count:
                break
            if (skip_protected and i in protected) or (respect_min and len(out.get(i, [])) >= n_heads - min_heads):
                continue
            out.setdefault(i, []).append(h)
        return {i: sorted(h) for i, h in out.items()}

    free = [i for i in range(n_layers) if i not in protected]
    per_layer: dict[int, list[int]] = {}
    if free:
        share = count // len(free)
        for j, i in enumerate(free):
            k = min(share + (j < count % len(free)), n_heads - min_heads)
            per_layer[i] = sorted(torch.argsort(scores[i], stable=True)[:k].tolist()) if k else []
    return {
        "protections ignored": take(order, skip_protected=False),
        "minimum ignored": take(order, respect_min=False),
        "highest": take(order[::-1]),
        "per layer": {i: h for i, h in per_layer.items() if h},
    }


_SELECTION_HINTS = {
    "protections ignored": "you removed heads from a protected layer: skip the first protect_first and the last "
                           "protect_last layers entirely",
    "minimum ignored": "a layer kept fewer than min_heads heads: when a layer is down to min_heads, skip its "
                       "remaining heads and go on with the next-lowest head of another layer",
    "highest": "you removed the HIGHEST-scored heads: higher scores mean more important, remove the lowest",
    "per layer": "you took the same number of heads from every layer: rank all heads of all allowed layers "
                 "TOGETHER (one global order) and take the lowest, wherever they are",
}


def _judge_selection(got, expected: dict, scores, count, protect_first, protect_last, min_heads, where) -> None:
    n_layers, n_heads = scores.shape
    got = _normalised_selection(got, where)
    if got == expected:
        return
    for name, variant in _selection_variants(scores, count, protect_first, protect_last, min_heads).items():
        if got == variant and variant != expected:
            check(False, f"{where}: {_SELECTION_HINTS[name]}")
    removed = sum(map(len, got.values()))
    check(removed == count, f"{where}: you removed {removed} heads, count asks for {count}")
    protected = [i for i in got if i < protect_first or i >= n_layers - protect_last]
    check(not protected, f"{where}: layers {protected} are protected: {_SELECTION_HINTS['protections ignored']}")
    thin = [i for i, h in got.items() if n_heads - len(h) < min_heads]
    check(not thin, f"{where}: layers {thin} keep fewer than min_heads={min_heads}: {_SELECTION_HINTS['minimum ignored']}")
    check(False, f"{where}: got {got} but expected {expected}: sort every head of the unprotected layers by score "
                 "(lowest first; ties: lower layer, then lower head) and take them one by one, skipping a head "
                 "whose layer is already down to min_heads, until count heads are chosen")


def check_head_selection(fn: Callable, model: nn.Module, scores: torch.Tensor, count: int, *, protect_first: int = 1,
                         protect_last: int = 1, min_heads: int = 1) -> dict[int, list[int]]:
    """Check ``fn(scores, count, protect_first, protect_last, min_heads) -> {layer: [heads]}``.

    The reference is ``select_heads(model, scores, count=..., multiple=1)`` (no width alignment):
    the ``count`` lowest-scored heads over all unprotected layers, each layer keeping at least
    ``min_heads``. Judged on ``scores`` with the given rules, then on synthetic scores built so that
    every rule decides something (the lowest scores sit in a protected layer, and one layer is
    weak enough to be emptied without ``min_heads``). Returns the learner's selection on ``scores``.
    """
    from ..selection import select_heads

    scores = torch.as_tensor(scores, dtype=torch.float32)
    n_layers, n_heads = scores.shape

    def reference(s, c, pf, pl, mh):
        plan = select_heads(model, s, count=c, protect_first=pf, protect_last=pl, min_heads=mh, multiple=1,
                            strict=True)
        return {i: sorted(h) for i, h in plan.heads.items()}

    rules = (protect_first, protect_last, min_heads)
    got = _normalised_selection(fn(scores.clone(), count, *rules), "your scores")
    _judge_selection(got, reference(scores, count, *rules), scores, count, *rules, "on the given scores")
    g = torch.Generator().manual_seed(0)
    synthetic = torch.rand(n_layers, n_heads, generator=g) + 1.0
    pf, pl = min(1, n_layers - 1), 1 if n_layers > 2 else 0
    synthetic[0] -= 1.0  # the lowest scores of all: only the protection keeps them
    weak = pf  # the first unprotected layer: weak enough to be emptied without min_heads
    synthetic[weak] -= 0.9
    capacity = (n_layers - pf - pl) * (n_heads - 1)
    counts = sorted({min(n_heads - 1, capacity), min(n_heads + 1, capacity)})  # the weak layer alone; then beyond it
    for c in counts:
        _judge_selection(fn(synthetic.clone(), c, pf, pl, 1), reference(synthetic, c, pf, pl, 1), synthetic, c, pf,
                         pl, 1, f"synthetic scores (protect_first={pf}, protect_last={pl}, min_heads=1, count={c})")
    print(f"check_head_selection: {count} heads on your scores and {' and '.join(map(str, counts))} on synthetic "
          "scores, as select_heads chooses")
    return got


# ----------------------------------------------------------------------------- teaching helpers


def taylor_by_part(model: nn.Module, calib, *, batch_size: int = 8, loss_fn=None) -> dict[str, torch.Tensor]:
    """``{"q", "k", "v", "o"} -> [L, H]``: each head's ``sum |grad * w|`` split by projection.

    The same quantity as ``head_scores(..., "taylor")`` (which is the sum of the four parts), on a
    deep copy of ``model`` so the model is never touched. K and V are shared by the query heads
    of a KV group (GQA): their totals are divided equally among the group, as the library does.
    Only layers with the widest head count are supported (unpruned models).
    """
    from ..importance._calibration import iterate, make_batches, pad_id, resolve_loss_fn

    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(work)
    blocks = list(adapter.blocks(work))
    d = adapter.head_dim(work)
    mods = []
    for block in blocks:
        q, k, v = adapter.qkv(block)
        mods.append((q, k, v, adapter.o_proj(block), adapter.num_heads(block), adapter.num_kv_heads(block)))
    params = [p for q, k, v, o, _, _ in mods for lin in (q, k, v, o) for p in lin.parameters()]
    for p in params:
        p.requires_grad_(True)
    batches = make_batches(calib, batch_size, pad_id(work))
    loss_fn = resolve_loss_fn(work, loss_fn, batches)
    n_max = max(m[4] for m in mods)
    out = {part: torch.zeros(len(blocks), n_max, dtype=torch.float64) for part in PARTS}
    for batch in iterate(batches, work, False, "taylor by part"):
        for p in params:
            p.grad = None
        loss_fn(work, batch).backward()
        with torch.no_grad():
            for layer, (q, k, v, o, n, n_kv) in enumerate(mods):
                g = n // n_kv

                def rows(lin, heads):
                    s = (lin.weight.grad * lin.weight).abs().double().reshape(heads, d, -1).sum((1, 2))
                    if lin.bias is not None:
                        s = s + (lin.bias.grad * lin.bias).abs().double().reshape(heads, d).sum(1)
                    return s

                out["q"][layer, :n] += rows(q, n)
                out["k"][layer, :n] += rows(k, n_kv).repeat_interleave(g) / g
                out["v"][layer, :n] += rows(v, n_kv).repeat_interleave(g) / g
                w = (o.weight.grad * o.weight).abs().double()
                out["o"][layer, :n] += w.reshape(w.shape[0], n, d).sum((0, 2))
    del work
    return {part: t.float() for part, t in out.items()}


@torch.no_grad()
def classifier_loss_accuracy(model: nn.Module, batches: Sequence[dict]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a sequence classifier over batches with ``labels``."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"].to(device)
        logits = model(**inputs).logits.float()
        total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.numel()
    return total_loss / count, correct / count


def head_removal_oracle(model: nn.Module, heads: Sequence[tuple[int, int]],
                        metric: Callable[[nn.Module], float | tuple]) -> torch.Tensor:
    """``metric(model without head (l, h)) - metric(model)`` for each ``(l, h)`` in ``heads``.

    Each variant is ``apply_plan`` on a deep copy (real surgery, one head removed); ``model`` is
    never touched. ``metric`` may return a float or a tuple of floats (e.g. loss and accuracy):
    the result is ``[len(heads)]`` or ``[len(heads), len(tuple)]``.
    """
    from ..plan import PruningPlan
    from ..surgery import apply_plan

    base = torch.as_tensor(metric(model), dtype=torch.float64)
    changes = []
    for layer, head in heads:
        variant = apply_plan(copy.deepcopy(model), PruningPlan(heads={int(layer): [int(head)]}))
        changes.append(torch.as_tensor(metric(variant), dtype=torch.float64) - base)
        del variant
    return torch.stack(changes)


def sentiment_batches(tokenizer, split: str = "train", n: int = 64, batch_size: int = 16,
                      start: int = 0, sort_by_length: bool = False) -> list[dict]:
    """Labelled sentiment batches: a list of dicts with ``input_ids``, ``attention_mask``, ``labels``.

    Rows ``start .. start + n`` of ``split`` (``n = 0``: all of it), tokenized like the
    fine-tuned baseline (``sentiment.MAX_LENGTH``) and padded per batch. Used as calibration
    data for the encoder's head scores (``split="train"``) and as a small evaluation set
    (``split="validation"``). ``sort_by_length`` groups sentences of similar length so that
    batches carry little padding (faster evaluation; the set of sentences is the same).
    """
    from ..sentiment import MAX_LENGTH, split_rows

    texts, labels = split_rows(split)
    end = len(texts) if n == 0 else min(start + n, len(texts))
    texts, labels = list(texts[start:end]), list(labels[start:end])
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    batches = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": torch.tensor(labels[s:s + batch_size], dtype=torch.long)})
    return batches


def spearman_permutation_p(x, y, n_permutations: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """(Spearman rho of ``x`` and ``y``, one-sided permutation p-value of a rho at least that large).

    The p-value is the share of ``n_permutations`` random shufflings of ``y`` whose rho is >= the
    observed one: how often chance alone gives an agreement this good on so few points.
    """
    from ..importance import rank_correlation
    from ..importance.layers import average_ranks

    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    rho = rank_correlation(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    gen = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(n_permutations, len(y), generator=gen), dim=1)
    null = (ry[perms] * rx).sum(1) / torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    return rho, float((null >= rho - 1e-12).double().mean())
