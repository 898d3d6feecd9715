"""Reconstruction: refit the projections that consume removed heads and neurons.

Removing query heads or MLP neurons deletes input columns of exactly one projection per block
(Llama: ``o_proj`` and ``down_proj``; BERT: the attention output and FFN output dense). The kept
columns can take over part of what the removed ones did. With ``X`` the consumer's inputs on
calibration tokens and ``[W, b]`` its weight and bias, the refit solves

    min over W', b'   sum_t  w_t * || X_t,kept W'^T + b' - (X_t W^T + b) ||^2

by ridge-damped least squares, accumulated in float64 (``Gram``). The bias ``b'`` is what
compensates the removed units' mean output (FLAP's idea, here fitted jointly with the weights);
Llama blocks have no bias on these projections, so reconstruction adds one and the pruned config
records it (``layer_shapes[i]["o_bias"]`` / ``["mlp_out_bias"]``) so that ``from_pretrained``
rebuilds it.

**Token weights.** ``w_t = 1 / ||h_t||^2``, with ``h_t`` the residual stream entering the block.
The next block reads the stream through a norm, so an error matters relative to the size of the
stream it lands in. The weighting also keeps the few tokens with huge residual norms (SmolLM2's
first token of each sequence: an attention sink) from deciding the fit, and it puts every layer's
error on one scale, the mean relative squared error per token: that is what lets the budget
planner (``course_lib.budget``) compare a neuron of layer 3 with a head of layer 20.

**Order.** ``reconstruct`` walks the blocks in order with the already pruned and refitted prefix
producing each block's inputs, so every refit sees the inputs it will get at inference. The
target is the unpruned projection applied to those same inputs. (Targeting the dense model's own
activations instead, so as to also undo the prefix's drift, was measured worse: see
``shared/reference/quality-anchors.md``.) One block's Gram matrices are in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SettingError
from ._hooks import BlockStream, capture_inputs
from .importance._calibration import per_block
from .plan import PruningPlan
from .pruned_modeling import adapter_for, add_bias

DEFAULT_RIDGE = 1e-2  # damping, as a fraction of the mean diagonal of the Gram matrix


class Gram:
    """Weighted second moments of a projection's inputs, with a constant column appended.

    ``matrix[:n, :n] = sum_t w_t x_t x_t^T``, ``matrix[:n, n] = sum_t w_t x_t``,
    ``matrix[n, n] = sum_t w_t``; float64, so that 8,000 tokens of float32 activations sum without
    losing the small eigenvalues the refit depends on.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Add inputs ``x [..., n]`` with per-token weights ``weights [...]`` (0 = padding)."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        w = weights.reshape(-1).to(torch.float64)
        keep = w > 0
        x, w = x[keep], w[keep]
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        self.matrix += (xa * w[:, None]).T @ xa
        self.tokens += int(keep.sum())

    def damped(self, ridge: float) -> torch.Tensor:
        """The matrix with ``ridge * mean(diag)`` added on the diagonal of the input columns."""
        g = self.matrix.clone()
        n = g.shape[0] - 1
        diag = torch.diagonal(g)[:n]
        g[range(n), range(n)] += ridge * diag.mean().clamp_min(1e-12) + 1e-12
        return g


def augmented_weight(linear: nn.Linear) -> torch.Tensor:
    """``[W, b]`` in float64 (``b = 0`` for a linear without bias)."""
    w = linear.weight.detach().to(torch.float64)
    b = linear.bias.detach().to(torch.float64) if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                          device=w.device)
    return torch.cat([w, b[:, None]], dim=1)


def refit(linear: nn.Linear, gram: Gram, keep: torch.Tensor, ridge: float = DEFAULT_RIDGE, *,
          intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights ``[out, len(keep)]`` and bias ``[out]`` for the kept input columns.

    The target is the projection as it is now (all columns), on the inputs summarised in ``gram``.
    ``intercept=False`` keeps the bias as it is (``None`` for a linear without one) and fits the
    weights alone.
    """
    n = linear.in_features
    keep = torch.as_tensor(keep, dtype=torch.long)
    g = gram.damped(ridge)
    target = augmented_weight(linear)  # [out, n + 1]
    if intercept:
        cols = torch.cat([keep, torch.tensor([n])])
        beta = torch.linalg.solve(g[cols][:, cols], g[cols] @ target.T).T  # [out, k + 1]
        return beta[:, :-1], beta[:, -1]
    beta = torch.linalg.solve(g[keep][:, keep], g[keep, :n] @ target[:, :n].T).T
    return beta, None if linear.bias is None else linear.bias.detach().to(torch.float64)


def change_error(old: torch.Tensor, new: torch.Tensor, gram: Gram) -> float:
    """``trace(D G D^T) / tokens`` for ``D = new - old`` (augmented ``[W, b]`` weights)."""
    d = new - old
    return float(torch.einsum("oi,ij,oj->", d, gram.matrix, d)) / max(gram.tokens, 1)


def obs_cost(inv: torch.Tensor, weight: torch.Tensor, removed: torch.Tensor) -> float:
    """``trace(W_S (G^-1)_SS^-1 W_S^T)``: what removing columns ``removed`` costs once the rest is refitted.

    ``inv`` is the inverse of the (damped, augmented) Gram matrix and ``weight`` the augmented
    ``[W, b]``; the optimal-brain-surgeon cost of the set, exact for least squares (not yet per token).
    """
    if len(removed) == 0:
        return 0.0
    idx = torch.as_tensor(removed, dtype=torch.long)
    w = weight[:, idx]
    return float(torch.trace(w @ torch.linalg.solve(inv[idx][:, idx], w.T)))


def removal_error(linear: nn.Linear, gram: Gram, removed: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    """Weighted squared error per token left after removing the input columns ``removed`` and refitting.

    ``obs_cost`` divided by the token count, so it reads as a mean relative squared error.
    """
    if len(removed) == 0:
        return 0.0
    return obs_cost(torch.linalg.inv(gram.damped(ridge)), augmented_weight(linear), removed) / max(gram.tokens, 1)


def removal_path(linear: nn.Linear, gram: Gram, unit: int, max_units: int, *, step: int = 1,
                 ridge: float = DEFAULT_RIDGE) -> tuple[list[int], list[float]]:
    """Greedy optimal-brain-surgeon order of input units (blocks of ``unit`` columns) to remove.

    Removes ``step`` units at a time, each time the ones whose removal (with the rest refitted)
    costs least, then downdates the inverse Gram matrix so the next costs assume the refit.
    Returns the units in removal order and the cumulative error (as ``removal_error``) after each
    of ``0 .. max_units`` removed, the error at ``k`` exact for the first ``k`` units of the order.
    """
    inv = torch.linalg.inv(gram.damped(ridge))
    w = augmented_weight(linear)
    n_units = linear.in_features // unit
    alive = torch.ones(n_units, dtype=torch.bool)
    order: list[int] = []
    errors = [0.0]
    total = 0.0
    cols = torch.arange(n_units * unit).reshape(n_units, unit)
    while len(order) < max_units:
        live = alive.nonzero().flatten()
        c = cols[live]  # [m, unit]
        if unit == 1:  # the common case (neurons), without batched 1 x 1 solves
            costs = w[:, live].pow(2).sum(0) / torch.diagonal(inv)[live]
        else:
            blocks = inv[c[:, :, None], c[:, None, :]]  # [m, unit, unit]
            ws = w[:, c].permute(1, 0, 2)  # [m, out, unit]
            costs = torch.einsum("mou,mou->m", ws, torch.linalg.solve(blocks, ws.transpose(1, 2)).transpose(1, 2))
        take = live[torch.argsort(costs)[: min(step, max_units - len(order))]]
        idx = cols[take].reshape(-1)
        solve = torch.linalg.solve(inv[idx][:, idx], inv[idx])  # [s, n + 1]
        total += obs_cost(inv, w, idx)
        w.addmm_(w[:, idx], solve, alpha=-1)  # in place: the 1,537^2 inverse is rewritten every step
        inv.addmm_(inv[:, idx], solve, alpha=-1)
        alive[take] = False
        order.extend(take.tolist())
        errors.extend([float("nan")] * (len(take) - 1) + [total / max(gram.tokens, 1)])
    return order, errors


@dataclass
class ReconstructionReport:
    """Per refitted projection: relative squared error per token without and with the refit."""

    rows: list[dict]

    def __str__(self) -> str:
        lines = ["layer  projection  error, zeroed only  error, refitted"]
        lines += [f"{r['layer']:>5}  {r['projection']:>10}  {r['zeroed']:>18.3e}  {r['refitted']:>15.3e}"
                  for r in self.rows]
        return "\n".join(lines)


def _consumers(adapter, model, block, plan: PruningPlan, layer: int) -> list[tuple[str, nn.Linear, torch.Tensor]]:
    """(name, consumer projection, kept input columns) for each part of the block the plan narrows."""
    out = []
    q_keep, _ = plan.kept_heads(model, layer)
    n_q = adapter.num_heads(block)
    if len(q_keep) < n_q:
        d = adapter.head_dim(model)
        out.append(("attention", adapter.o_proj(block), torch.cat([torch.arange(h * d, (h + 1) * d) for h in q_keep])))
    gone = set(plan.neurons.get(layer, []))
    if gone:
        n = adapter.intermediate_size(block)
        out.append(("mlp", adapter.mlp_out(block), torch.tensor([j for j in range(n) if j not in gone])))
    return out


def reconstruct(model: nn.Module, plan: PruningPlan, calib, *, ridge: float = DEFAULT_RIDGE, bias: bool = True,
                batch_size: int = 8, progress: bool = True) -> ReconstructionReport:
    """Refit, in the *unpruned* ``model``, the consumers of everything ``plan`` removes.

    Block by block, with the stream coming from the blocks already refitted: capture the consumer's
    inputs, solve for the kept columns (and a bias unless ``bias=False``), and set the removed
    columns to zero. Afterwards the model computes exactly what the pruned model will, and
    ``surgery.apply_plan`` only drops zero columns. Blocks the plan removes whole are skipped
    (the stream passes them unchanged). Call ``prune_and_reconstruct`` for both steps in one.
    """
    plan.validate(model)
    if not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise SettingError(f"ridge must be a non-negative number, got {ridge!r}")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(plan.layers)]
    consumers = {i: _consumers(adapter, model, blocks[i], plan, i) for i in kept}
    last = max((i for i in kept if consumers[i]), default=None)
    if last is None:  # only whole blocks go: nothing to refit, no pass over the data
        return ReconstructionReport([])
    stream = BlockStream.capture(model, calib, batch_size=batch_size)
    rows = []
    with torch.no_grad():
        for i in per_block([i for i in kept if i <= last], progress, "reconstruct"):
            block = blocks[i]
            weights = stream.weights()  # of the stream entering the block: the same for both consumers
            for name, linear, keep in consumers[i]:
                gram = Gram(linear.in_features, linear.weight.device)
                capture_inputs(block, linear, stream, lambda x, b: gram.add(x, weights[b]))
                old = augmented_weight(linear)
                weight, new_bias = refit(linear, gram, keep, ridge, intercept=bias)
                new = torch.zeros_like(old)
                new[:, keep] = weight
                if new_bias is not None:
                    new[:, -1] = new_bias
                zeroed = old.clone()
                zeroed[:, torch.tensor(sorted(set(range(linear.in_features)) - set(keep.tolist())))] = 0
                rows.append({"layer": i, "projection": name, "zeroed": change_error(old, zeroed, gram),
                             "refitted": change_error(old, new, gram)})
                _assign(linear, new)
            stream.advance(block)
    return ReconstructionReport(rows)


def _assign(linear: nn.Linear, augmented: torch.Tensor) -> None:
    """Write ``[W, b]`` into ``linear``, giving it a bias parameter if it had none and one is needed."""
    linear.weight.copy_(augmented[:, :-1].to(linear.weight.dtype))
    b = augmented[:, -1]
    if linear.bias is None:
        if not torch.any(b != 0):
            return
        add_bias(linear)
    linear.bias.copy_(b.to(linear.bias.dtype))


def prune_and_reconstruct(model: nn.Module, plan: PruningPlan, calib, **kwargs) -> ReconstructionReport:
    """``reconstruct`` then ``surgery.apply_plan``: the pruned model with its consumers refitted."""
    from .surgery import apply_plan

    report = reconstruct(model, plan, calib, **kwargs)
    apply_plan(model, plan)
    return report
