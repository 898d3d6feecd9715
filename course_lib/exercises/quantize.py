"""Notebook 08 (prune, recover, then quantize): the INT4 round-to-nearest exercise, the share of weight
groups already on a 4-bit grid, and a widget to see what a group size does to one matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..quantize import ZERO_POINTS, fake_quantize
from . import check


def _block_weights(model: nn.Module) -> list[torch.Tensor]:
    from ..pruned_modeling import adapter_for

    return [m.weight.detach() for block in adapter_for(model).blocks(model) for m in block.modules()
            if isinstance(m, nn.Linear)]


def grid_share(model: nn.Module, *, group_size: int = 32, levels: int = 16) -> float:
    """Share of the block linears' weight groups (``group_size`` consecutive inputs of a row) that hold at
    most ``levels`` distinct values: what a 4-bit release format such as GGUF's Q4_1 leaves behind."""
    on_grid = total = 0
    for w in _block_weights(model):
        rows, cols = w.shape
        check(cols % group_size == 0, f"group_size={group_size} does not divide a width of {cols}")
        groups = w.reshape(-1, group_size).sort(dim=-1).values
        distinct = (groups.diff(dim=-1) != 0).sum(-1) + 1
        on_grid += int((distinct <= levels).sum())
        total += groups.shape[0]
    return on_grid / total


@dataclass
class UpdateVsStep:
    median_steps: float  # median |after - before| per weight, in INT4 steps of its group
    p99_steps: float  # 99th percentile of the same
    kept: float  # share of the update that survives rounding: 1 kept on average, 0 rounded away


def update_vs_step(before: nn.Module, after: nn.Module, *, group_size: int = 32,
                   zero_point: str = "integer") -> UpdateVsStep:
    """How fine-tuning's change to the weights compares with an INT4 step, and how much of it rounding keeps.

    ``before`` and ``after`` have the same block shapes (``after`` fine-tuned from ``before``); a step is
    a group's (max - min) / 15 in ``before``. ``kept`` projects the change rounding makes,
    ``round(after) - round(before)``, on the update ``after - before``: a weight that sits on a grid point
    does not move for an update under half a step (0), while weights at random offsets from the grid
    move by their update on average, as with dither (1).
    """
    pairs = list(zip(_block_weights(before), _block_weights(after), strict=True))
    check(all(a.shape == b.shape for a, b in pairs), "before and after must have the same block shapes")
    steps, along, length = [], 0.0, 0.0
    for w0, w1 in pairs:
        groups = w0.reshape(-1, group_size)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).clamp(min=1e-12)[:, None]
        update = w1 - w0
        steps.append((update.reshape(-1, group_size).abs() / step).flatten()[::97])  # a sample: quantile's size limit
        moved = (fake_quantize(w1, group_size=group_size, zero_point=zero_point)
                 - fake_quantize(w0, group_size=group_size, zero_point=zero_point))
        along += float((moved * update).sum())
        length += float((update * update).sum())
    sample = torch.cat(steps)
    check(length > 0, "after equals before: there is no update to measure")
    return UpdateVsStep(float(sample.median()), float(sample.quantile(0.99)), along / length)


def _symmetric(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 7
    return (torch.clamp(torch.round(g / scale), -8, 7) * scale).reshape(rows, cols)


def _unclamped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / 15
    zero = -torch.round(low / scale)
    return ((torch.round(g / scale) + zero - zero) * scale).reshape(rows, cols)


def check_rtn_int4(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Compare ``fn(w, group_size)`` with ``quantize.fake_quantize`` exactly, and name the mistake."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=generator) * torch.linspace(0.1, 3.0, 64)  # columns of different scales
    w[0, :16] = 0.25  # a constant group: the scale's floor
    w[1, :16] = torch.linspace(1.0, 2.0, 16)  # an all-positive group: the zero point and the levels clamp
    for group_size in (16, 32, 64):
        got = fn(w.clone(), group_size)
        check(isinstance(got, torch.Tensor) and got.shape == w.shape and got.dtype == w.dtype,
              f"return the dequantized matrix, shape {tuple(w.shape)} and dtype {w.dtype}")
        want = fake_quantize(w, group_size=group_size)
        if torch.equal(got, want):
            continue
        if torch.allclose(got, _symmetric(w, group_size), atol=1e-6):
            raise AssertionError(f"group_size={group_size}: that is the symmetric grid (-8..7 around zero); use the "
                                 "asymmetric one: 16 levels between each group's min and max, with a zero point")
        if torch.allclose(got, fake_quantize(w.t().contiguous(), group_size=group_size).t(), atol=1e-6):
            raise AssertionError(f"group_size={group_size}: groups run along a row (consecutive inputs), not down a column")
        if torch.allclose(got, _unclamped(w, group_size), atol=1e-6):
            raise AssertionError(f"group_size={group_size}: clamp the zero point and the levels to 0..15")
        worst = float((got - want).abs().max())
        raise AssertionError(f"group_size={group_size}: differs from the library by up to {worst:.3g}; check the scale "
                             "(max - min) / 15 floored at 1e-5, the rounded zero point and the clamps")


def column(group_size: int, zero_point: str = "integer") -> str:
    """The name notebook 08's table gives RTN at ``group_size`` with ``zero_point``: "RTN g64", "RTN g32 float zero"."""
    return f"RTN g{group_size}" + ("" if zero_point == "integer" else f" {zero_point} zero")


@dataclass
class GroupView:
    group_size: int
    zero_point: str
    layer: int
    errors: dict[str, float]  # relative Frobenius error of the rounded down-projection, per model
    row_errors: dict[str, torch.Tensor]


class GroupSizeExplorer:
    """Round one layer's MLP down-projection at a chosen group size and zero point, for every model in
    ``models``, next to the perplexities measured for the whole models (``table``: ``{model: {column(g, z): ppl}}``)."""

    def __init__(self, models: dict[str, nn.Module], table: dict[str, dict[str, float]], *,
                 group_sizes=(32, 64, 128), draw: bool = True):
        import ipywidgets as widgets

        from ..pruned_modeling import adapter_for

        check(len(models) > 0, "models must be {name: model}, non-empty")
        self.models, self.table, self.draw, self.figure = models, table, draw, None
        self.downs = {name: [adapter_for(m).mlp_out(b).weight.detach() for b in adapter_for(m).blocks(m)]
                      for name, m in models.items()}
        depth = min(len(d) for d in self.downs.values())
        self.group = widgets.ToggleButtons(options=list(group_sizes), description="group size")
        self.zero = widgets.ToggleButtons(options=list(ZERO_POINTS), description="zero point")
        self.layer = widgets.IntSlider(value=0, min=0, max=depth - 1, description="layer", continuous_update=False)
        self.label = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([self.group, widgets.HBox([self.zero, self.layer]), self.label, self.output])
        self.current: GroupView | None = None
        for control in (self.group, self.zero, self.layer):
            control.observe(lambda change: self.update(self.group.value, self.layer.value, self.zero.value),
                            names="value")
        self.update(self.group.value, self.layer.value, self.zero.value)

    def update(self, group_size: int, layer: int, zero_point: str = "integer") -> GroupView:
        check(0 <= layer <= self.layer.max, f"layer must be in 0..{self.layer.max}, got {layer}")
        check(zero_point in ZERO_POINTS, f"zero_point must be one of {', '.join(ZERO_POINTS)}, got {zero_point!r}")
        errors, rows = {}, {}
        for name, downs in self.downs.items():
            w = downs[layer].float()
            diff = w - fake_quantize(w, group_size=group_size, zero_point=zero_point)
            errors[name] = float(diff.norm() / w.norm())
            rows[name] = diff.norm(dim=1) / w.norm(dim=1).clamp(min=1e-12)
        self.current = v = GroupView(group_size, zero_point, layer, errors, rows)
        key = column(group_size, zero_point)
        measured = ", ".join(f"{name} {self.table[name][key]:.2f}" for name in self.models
                             if key in self.table.get(name, {}))
        self.label.value = (f"layer {layer} (each model's own block {layer}) down-projection at groups of {group_size}, "
                            f"{zero_point} zero point: "
                            + ", ".join(f"{k} error {e:.2%}" for k, e in errors.items())
                            + (f"; whole-model RTN perplexity: {measured}" if measured else ""))
        if self.draw:
            import matplotlib.pyplot as plt

            from ..viz import show_in

            fig, ax = plt.subplots(figsize=(8, 2.8))
            for name, r in rows.items():
                ax.plot(r.numpy(), lw=0.8, label=f"{name}: {errors[name]:.2%}")
            ax.set(xlabel="output row", ylabel="relative error",
                   title=f"RTN INT4, groups of {group_size}, {zero_point} zero point, layer {layer}")
            ax.legend(fontsize=8)
            self.figure = show_in(self.output, fig)
        return v


def group_size_explorer(models: dict[str, nn.Module], table: dict, **kwargs):
    """``(widget, explorer)``: display ``widget``; drive or inspect ``explorer`` from code."""
    explorer = GroupSizeExplorer(models, table, **kwargs)
    return explorer.widget, explorer
