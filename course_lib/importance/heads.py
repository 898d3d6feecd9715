"""Attention-head importance: one score per query head per layer, as a plain ``[L, H_max]`` tensor.

Methods (``method=``):

``"taylor"``
    First-order Taylor: ``sum |dL/dw * w|`` over every parameter of the head, accumulated over
    calibration batches (the absolute value is taken per batch, then summed). A query head's
    parameters are its rows of Q (and Q bias), its input columns of O, and its share of the K and
    V rows (and biases) of its KV head. **GQA / MQA rule:** a KV head's K/V rows serve all the
    query heads of its group, so the KV head's total is divided equally among them (each of the
    ``g = num_heads // num_kv_heads`` query heads gets ``1/g`` of it). So the scores of one layer
    add up to the layer's whole attention total, and :func:`kv_group_scores` (a sum over the
    group) gives back the exact KV-group total. The O bias is shared by all heads and is not
    counted.
``"magnitude"``
    L2 norm of the same parameter set, with the same sharing rule applied to squared norms:
    ``sqrt(|Q_h|^2 + |O_h|^2 + (|K_g|^2 + |V_g|^2) / g)``. Needs no calibration data.
``"output_norm"``
    Mean L2 norm of each head's context vector (the input of O, sliced per head) over all real
    (non-padding) tokens. It looks at the context only, so it is blind to O: a head whose O
    columns are zero but whose V is not still scores its context norm.
``"mask_gradient"``
    Michel et al. (2019), "Are Sixteen Heads Really Better than One?": a gate ``xi_h = 1`` per
    query head multiplies the head's slice of O's input (a forward pre-hook on O);
    the score is ``|dL/dxi_h|`` accumulated over calibration batches (absolute value per batch,
    then summed; no per-layer normalisation).

Scores accumulate in float64 and are returned as float32. A layer with fewer heads than the
widest layer (a pruned model) gets NaN in the missing columns. The model is never changed: see
:func:`course_lib.importance._calibration.scoring_session`.
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
    real_token_inputs,
    resolve_loss_fn,
    scoring_session,
)

HEAD_METHODS = ("taylor", "magnitude", "output_norm", "mask_gradient")


def head_scores(
    model: nn.Module,
    calib=None,
    method: str = "taylor",
    *,
    batch_size: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``[L, H_max]`` importance of every query head (higher = more important).

    ``calib``: a LongTensor ``[N, T]`` of token ids or a list of dicts of tensors (not needed for
    ``"magnitude"``). ``loss_fn(model, batch) -> scalar`` for ``"taylor"`` and
    ``"mask_gradient"``; by default the LM loss for causal LMs, else the head's loss on the
    batch's ``labels``. See the module docstring for the definitions.
    """
    if method not in HEAD_METHODS:
        raise SettingError(f"unknown head scoring method {method!r}; allowed: {', '.join(HEAD_METHODS)}")
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    shapes = [(adapter.num_heads(b), adapter.num_kv_heads(b)) for b in blocks]
    head_dim = adapter.head_dim(model)
    if method == "magnitude":
        per_layer = [_magnitude(adapter, block, nq, nkv, head_dim) for block, (nq, nkv) in zip(blocks, shapes)]
        return _pad(per_layer)
    batches = make_batches(calib, batch_size, pad_id(model))
    if method == "output_norm":
        per_layer = _output_norm(model, adapter, blocks, shapes, head_dim, batches, progress)
    else:
        loss_fn = resolve_loss_fn(model, loss_fn, batches)
        if method == "taylor":
            per_layer = _taylor(model, adapter, blocks, shapes, head_dim, batches, loss_fn, progress)
        else:
            per_layer = _mask_gradient(model, adapter, blocks, shapes, head_dim, batches, loss_fn, progress)
    return _pad(per_layer)


def kv_group_scores(head_scores: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``[L, G_max]``: per KV group, the sum of its query heads' scores (NaN where absent).

    Query head ``h`` belongs to group ``h // (num_heads // num_kv_heads)``.
    """
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    if head_scores.dim() != 2 or head_scores.shape[0] != len(blocks):
        raise SettingError(f"head_scores must be [L={len(blocks)}, H_max], got shape {tuple(head_scores.shape)}")
    per_layer = []
    for layer, block in enumerate(blocks):
        nq, nkv = adapter.num_heads(block), adapter.num_kv_heads(block)
        if head_scores.shape[1] < nq:
            raise SettingError(f"head_scores has {head_scores.shape[1]} columns but layer {layer} has {nq} heads")
        per_layer.append(head_scores[layer, :nq].reshape(nkv, nq // nkv).sum(1))
    return _pad(per_layer).to(head_scores.dtype)


# ----------------------------------------------------------------------------- helpers


def _pad(per_layer: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.numel() for t in per_layer)
    out = torch.full((len(per_layer), width), float("nan"), dtype=torch.float32)
    for layer, t in enumerate(per_layer):
        out[layer, : t.numel()] = t.detach().to("cpu", torch.float32)
    return out


def _head_params(adapter, block) -> dict[str, torch.Tensor | None]:
    q, k, v = adapter.qkv(block)
    return {"q_w": q.weight, "q_b": q.bias, "k_w": k.weight, "k_b": k.bias, "v_w": v.weight, "v_b": v.bias,
            "o_w": adapter.o_proj(block).weight}


def _per_head(stats: dict[str, torch.Tensor | None], nq: int, nkv: int, d: int) -> torch.Tensor:
    """Sum element-wise ``stats`` (same layout as the weights) per query head, sharing K/V."""

    def rows(w, b, n):
        total = w.double().reshape(n, d, -1).sum((1, 2))
        return total if b is None else total + b.double().reshape(n, d).sum(1)

    q = rows(stats["q_w"], stats["q_b"], nq)
    o = stats["o_w"].double().reshape(stats["o_w"].shape[0], nq, d).sum((0, 2))
    kv = rows(stats["k_w"], stats["k_b"], nkv) + rows(stats["v_w"], stats["v_b"], nkv)
    group = nq // nkv
    return q + o + kv.repeat_interleave(group) / group


@torch.no_grad()
def _magnitude(adapter, block, nq, nkv, d) -> torch.Tensor:
    sq = {k: (None if p is None else p.detach().double() ** 2) for k, p in _head_params(adapter, block).items()}
    return _per_head(sq, nq, nkv, d).sqrt()


def _output_norm(model, adapter, blocks, shapes, d, batches, progress) -> list[torch.Tensor]:
    sums = [torch.zeros(nq, dtype=torch.float64) for nq, _ in shapes]

    def add(layer, x):
        sums[layer] += x.reshape(len(x), shapes[layer][0], d).float().norm(dim=-1).double().sum(0).cpu()

    count = real_token_inputs(model, [adapter.o_proj(b) for b in blocks], batches, progress, "head output_norm", add)
    return [s / count for s in sums]


def _taylor(model, adapter, blocks, shapes, d, batches, loss_fn, progress) -> list[torch.Tensor]:
    params = [_head_params(adapter, b) for b in blocks]
    flat = [(layer, key, p) for layer, ps in enumerate(params) for key, p in ps.items() if p is not None]
    totals = [torch.zeros(nq, dtype=torch.float64) for nq, _ in shapes]
    with scoring_session(model, trainable=[p for _, _, p in flat]), torch.enable_grad():
        for batch in iterate(batches, model, progress, "head taylor"):
            loss = as_scalar(loss_fn(model, batch))
            grads = torch.autograd.grad(loss, [p for _, _, p in flat], allow_unused=True)
            stats = [dict.fromkeys(ps) for ps in params]
            for (layer, key, p), g in zip(flat, grads):
                stats[layer][key] = torch.zeros_like(p) if g is None else (g.detach() * p.detach()).abs()
            for layer, (nq, nkv) in enumerate(shapes):
                totals[layer] += _per_head(stats[layer], nq, nkv, d).cpu()
            del grads, stats, loss
    return totals


def _mask_gradient(model, adapter, blocks, shapes, d, batches, loss_fn, progress) -> list[torch.Tensor]:
    totals = [torch.zeros(nq, dtype=torch.float64) for nq, _ in shapes]
    with scoring_session(model) as handles, torch.enable_grad():  # no parameter needs a gradient
        gates = [torch.ones(nq, device=adapter.o_proj(b).weight.device, requires_grad=True)
                 for b, (nq, _) in zip(blocks, shapes)]

        def make_hook(gate):
            def hook(module, args):
                x = args[0]
                return (x * gate.to(x.dtype).repeat_interleave(d),) + tuple(args[1:])

            return hook

        for block, gate in zip(blocks, gates):
            handles.append(adapter.o_proj(block).register_forward_pre_hook(make_hook(gate)))
        for batch in iterate(batches, model, progress, "head mask_gradient"):
            loss = as_scalar(loss_fn(model, batch))
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for layer, g in enumerate(grads):
                if g is not None:
                    totals[layer] += g.detach().abs().double().cpu()
    return totals
