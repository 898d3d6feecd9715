"""autoawq 0.2.9's quantizer with three repairs for the CPU: a scale search whose every trial starts
from the block's own weights, a leaner rounding, and a clipping search done as batched matmuls.

``course_lib.quantize`` passes ``quantizer_cls()`` to autoawq's ``quantize(quantizer_cls=...)``, the
hook autoawq offers for this. Everything else (calibration capture, scale formula, packing) is
autoawq's own.
"""

from __future__ import annotations

import functools

import torch

CLIP_CHUNK_ELEMENTS = 2**26  # bound on one [groups, tokens, rows] product of the clip search (256 MiB fp32)


@functools.cache
def quantizer_cls():
    """The repaired ``AwqQuantizer`` subclass, one per process (imported lazily: autoawq is heavy)."""
    from awq.quantize.quantizer import AwqQuantizer

    class CpuSafeAwqQuantizer(AwqQuantizer):
        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
            """autoawq's scale grid search, every trial starting from the block's own weights.

            autoawq snapshots the block with ``{k: v.cpu() for k, v in module.state_dict().items()}``
            and restores it after each of its 20 trial scales. On a GPU ``.cpu()`` copies; on a CPU it
            returns the very tensor, so the snapshot aliases the live weights and the first trial's
            in-place ``weight.mul_(scales)`` lands in it. Every later trial then starts from ``W * s0``
            instead of ``W``: its loss is that of a doubly scaled block, the first trial (ratio 0,
            which ignores the activations) wins every time, and the chosen scales go on top of
            ``W * s0``, ruining the model. Here the block's ``state_dict`` hands out copies for the
            length of the search, so the snapshot is one and the search compares what it means to.
            """
            live = module2inspect.state_dict
            module2inspect.state_dict = lambda *args, **kw: {k: v.clone() for k, v in live(*args, **kw).items()}
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, linears2scale,
                                                   fp16_output, kwargs)
            finally:
                del module2inspect.state_dict  # the class's method again

        def pseudo_quantize_tensor(self, w: torch.Tensor):
            """autoawq's zero-point rounding, the same operations in place and without its NaN checks.

            The scale search rounds every linear of a block once per trial (20 trials): autoawq's
            version, with three full passes to look for NaNs and a fresh tensor at every step, was a
            third of AWQ's time on SmolLM2 (2 CPU cores). This one returns the same tensors to the
            bit (tests/test_quantize.py) in under a third of the time (2.8 -> 0.8 ms, 1,536 x 576).
            """
            if not self.zero_point or self.group_size <= 0:
                return super().pseudo_quantize_tensor(w)
            rows = w.shape[0]
            groups = w.reshape(-1, self.group_size)
            top = 2**self.w_bit - 1
            low = groups.amin(dim=1, keepdim=True)
            scales = (groups.amax(dim=1, keepdim=True) - low).clamp_(min=1e-5).div_(top)
            zeros = torch.round(low / scales).neg_().clamp_(0, top)
            rounded = torch.round(groups / scales).add_(zeros).clamp_(0, top).sub_(zeros).mul_(scales)
            return rounded.reshape(w.shape), scales.view(rows, -1), zeros.view(rows, -1)

        @torch.no_grad()
        def _compute_best_clip(self, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):
            return best_clip(w, input_feat, self.pseudo_quantize_tensor, self.group_size, n_grid=n_grid,
                             max_shrink=max_shrink, n_sample_token=n_sample_token)

    return CpuSafeAwqQuantizer


@torch.no_grad()
def best_clip(w: torch.Tensor, input_feat: torch.Tensor, quantize, group_size: int, *, n_grid: int = 20,
              max_shrink: float = 0.5, n_sample_token: int = 512) -> torch.Tensor:
    """AWQ's clipping search: per output row and weight group, the clamp range (from 100% of the
    group's largest magnitude down to ``max_shrink``) whose rounded weights best reproduce the
    group's partial outputs on sampled calibration tokens. Returns ``[rows, groups, 1]``.

    The same search as autoawq's ``_compute_best_clip``, which forms each partial output as a
    broadcast product ``[rows, tokens, groups, group_size]`` and sums it: hundreds of MB per trial
    and most of the AWQ time on a CPU. Here each trial is one batched matmul over the groups, rows
    in chunks to bound memory; the result is the same to the bit (tests/test_quantize.py). AWQ on
    SmolLM2's 30 blocks, 8 x 128 calibration tokens, 2 cores: 72 s, against 285 s for autoawq's
    own search (benchmarks/awq_vs_rtn.py).
    """
    rows, cols = w.shape
    group = group_size if group_size > 0 else cols
    x = input_feat.reshape(-1, cols)
    x = x[:: max(1, x.shape[0] // n_sample_token)].to(w.device, w.dtype)
    x = x.reshape(x.shape[0], cols // group, group).transpose(0, 1)  # [groups, tokens, group]
    chunk = max(1, CLIP_CHUNK_ELEMENTS // (x.shape[0] * x.shape[1]))
    best = []
    for start in range(0, rows, chunk):
        block = w[start:start + chunk]
        grouped = block.reshape(block.shape[0], cols // group, group)  # [rows, groups, group]
        original_max = grouped.abs().amax(dim=-1, keepdim=True)

        def partial_outputs(weights: torch.Tensor) -> torch.Tensor:  # [groups, tokens, rows]
            return torch.bmm(x, weights.permute(1, 2, 0))

        reference = partial_outputs(grouped)
        best_max = original_max.clone()
        min_error = torch.full_like(original_max, float("inf"))
        for step in range(int(max_shrink * n_grid)):
            max_val = original_max * (1 - step / n_grid)
            clipped = torch.clamp(grouped, -max_val, max_val).reshape(block.shape)
            rounded = quantize(clipped)[0].reshape(grouped.shape)
            error = (partial_outputs(rounded) - reference).pow(2).mean(dim=1).t().unsqueeze(-1)
            better = error < min_error
            min_error[better] = error[better]
            best_max[better] = max_val[better]
        best.append(best_max)
    return torch.cat(best)
