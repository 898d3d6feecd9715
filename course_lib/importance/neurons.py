"""MLP-neuron importance: one score tensor per layer (widths may differ after pruning).

A neuron ``n`` of a block is row ``n`` of every MLP input projection (``gate`` and ``up`` for
gated MLPs, ``intermediate.dense`` for BERT) plus column ``n`` of the output projection. Its
activation ``X_n`` is the input of the output projection: ``act(gate x) * up x`` for gated MLPs,
``act(W_in x + b)`` otherwise. Methods (``method=``):

``"activation_frequency"``
    Share of real (non-padding) tokens with ``|X_n| > eps``. GELU and SiLU are almost never
    exactly zero, so "active" means "not near zero", and ``eps`` is an absolute threshold on the
    activation's scale. The default ``eps = 1e-2`` was chosen on SmolLM2-135M (calibration prose):
    with 1e-3 the neurons' frequencies all lie in [0.91, 1.0] (median 0.98), so the score barely
    separates them; with 1e-2 they spread over [0.6, 0.95] (1 %-90 % quantiles, median 0.87).
    For GELU encoders 1e-2 means "GELU is essentially off" (GELU(x) > -1e-2 only for x < -2.6 or
    |x| < 0.02). Rescale it for models with other activation scales (tiny randomly initialised
    models have activations of order 1e-3: use ~1e-4 there).
``"magnitude"``
    L2 norm of all the neuron's weights: its row(s) (and biases) in the input projections and its
    column in the output projection, ``sqrt(sum of squares)``. No calibration data needed.
``"wanda"``
    Wanda (Sun et al. 2023) applied per neuron: ``sum_i |W_out[i, n]| * ||X_n||_2``, where
    ``||X_n||_2`` is the L2 norm of the activation over every real calibration token.
``"taylor"``
    ``sum |dL/dw * w|`` over the neuron's parameters (as above; the output bias is shared and not
    counted), absolute value per batch, summed over batches.

``"fluctuation"``
    FLAP (An et al. 2024): ``Var_t(X_n) * ||W_out[:, n]||^2``, the variance of the neuron's
    activation over real tokens times its output column's squared norm: what the neuron adds to
    the output *beyond its mean*, which a bias can take over once it is gone (reconstruction
    fits that bias).
``"obs"``
    Optimal brain surgeon, structured: the least-squares error left in the MLP output when the
    neuron alone is removed and the others are refitted, ``||W_out[:, n]||^2 / [G^-1]_nn`` with
    ``G`` the (token-weighted, ridge-damped) Gram matrix of the activations, as in
    ``course_lib.reconstruction``. The budget planner's own currency, so it is comparable across
    layers; computed block by block (one Gram matrix in memory at a time).

All data-driven statistics except ``"obs"`` are streaming: a forward pre-hook on the output projection reduces the
current batch's activations to per-neuron running sums at once. Scores are float32 (accumulated
in float64); the model is never changed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SettingError
from ..pruned_modeling import adapter_for
from ._calibration import (
    LossFn,
    as_scalar,
    iterate,
    make_batches,
    pad_id,
    per_block,
    real_token_inputs,
    resolve_loss_fn,
    scoring_session,
)

NEURON_METHODS = ("activation_frequency", "magnitude", "wanda", "taylor", "fluctuation", "obs")
DEFAULT_EPS = 1e-2


def neuron_scores(
    model: nn.Module,
    calib=None,
    method: str = "wanda",
    *,
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """One ``[intermediate_size_l]`` float32 tensor per layer (higher = more important)."""
    if method not in NEURON_METHODS:
        raise SettingError(f"unknown neuron scoring method {method!r}; allowed: {', '.join(NEURON_METHODS)}")
    if not eps >= 0:
        raise SettingError(f"eps must be a non-negative number, got eps={eps!r}")
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    if method == "magnitude":
        return [_magnitude(adapter, b) for b in blocks]
    batches = make_batches(calib, batch_size, pad_id(model))
    if method == "taylor":
        return _taylor(model, adapter, blocks, batches, resolve_loss_fn(model, loss_fn, batches), progress)
    if method == "obs":
        return _obs(model, calib, batch_size, progress)
    counts, sums, sumsq, n_tokens = _activation_stats(model, adapter, blocks, batches, eps, progress, method)
    if method == "activation_frequency":
        return [(c / n_tokens).float() for c in counts]
    out = []
    for block, total, s in zip(blocks, sums, sumsq):
        w_out = adapter.mlp_out(block).weight.detach().double().cpu()
        if method == "wanda":
            out.append((w_out.abs().sum(0) * s.sqrt()).float())
        else:  # fluctuation: sample variance of the activation times the column's squared norm
            variance = (s - total**2 / n_tokens) / max(n_tokens - 1, 1)
            out.append((variance.clamp_min(0) * w_out.pow(2).sum(0)).float())
    return out


def _obs(model, calib, batch_size: int, progress: bool) -> list[torch.Tensor]:
    from .._hooks import BlockStream, capture_inputs
    from ..reconstruction import DEFAULT_RIDGE, Gram, augmented_weight

    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    out = []
    with scoring_session(model), torch.no_grad():
        stream = BlockStream.capture(model, calib, batch_size=batch_size)
        for block in per_block(blocks, progress, "neuron obs"):
            linear = adapter.mlp_out(block)
            gram, weights = Gram(linear.in_features, linear.weight.device), stream.weights()
            capture_inputs(block, linear, stream, lambda x, b: gram.add(x, weights[b]))
            inv = torch.linalg.inv(gram.damped(DEFAULT_RIDGE))
            w = augmented_weight(linear)[:, :-1]
            out.append((w.pow(2).sum(0) / torch.diagonal(inv)[:-1] / max(gram.tokens, 1)).float().cpu())
            stream.advance(block)
    return out


def _neuron_params(adapter, block) -> list[tuple[torch.Tensor, int]]:
    """(parameter, neuron dim) pairs: input rows (dim 0), input biases, output columns (dim 1)."""
    pairs = []
    for lin in adapter.mlp_in(block):
        pairs.append((lin.weight, 0))
        if lin.bias is not None:
            pairs.append((lin.bias, 0))
    pairs.append((adapter.mlp_out(block).weight, 1))
    return pairs


def _reduce(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum an element-wise statistic to one value per neuron (neurons along ``dim``)."""
    v = values.double()
    if v.dim() == 1:
        return v
    return v.sum(1) if dim == 0 else v.sum(0)


@torch.no_grad()
def _magnitude(adapter, block) -> torch.Tensor:
    total = sum(_reduce(p.detach() ** 2, dim) for p, dim in _neuron_params(adapter, block))
    return total.sqrt().float().cpu()


def _activation_stats(model, adapter, blocks, batches, eps, progress, method):
    counts = [torch.zeros(adapter.intermediate_size(b), dtype=torch.float64) for b in blocks]
    sums = [torch.zeros_like(c) for c in counts]
    sumsq = [torch.zeros_like(c) for c in counts]

    def add(layer, x):  # x: [real tokens, I]
        counts[layer] += (x.abs() > eps).sum(0).double().cpu()
        sums[layer] += x.double().sum(0).cpu()
        sumsq[layer] += x.double().pow(2).sum(0).cpu()

    n_tokens = real_token_inputs(model, [adapter.mlp_out(b) for b in blocks], batches, progress, f"neuron {method}",
                                 add)
    return counts, sums, sumsq, n_tokens


def _taylor(model, adapter, blocks, batches, loss_fn, progress) -> list[torch.Tensor]:
    per_block = [_neuron_params(adapter, b) for b in blocks]
    flat = [p for pairs in per_block for p, _ in pairs]
    totals = [torch.zeros(adapter.intermediate_size(b), dtype=torch.float64) for b in blocks]
    with scoring_session(model, trainable=flat), torch.enable_grad():
        for batch in iterate(batches, model, progress, "neuron taylor"):
            loss = as_scalar(loss_fn(model, batch))
            grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
            for layer, pairs in enumerate(per_block):
                for p, dim in pairs:
                    g = next(grads)
                    if g is not None:
                        totals[layer] += _reduce((g.detach() * p.detach()).abs(), dim).cpu()
            del loss, grads
    return [t.float() for t in totals]
