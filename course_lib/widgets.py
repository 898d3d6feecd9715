"""Interactive explorers for the notebooks (ipywidgets), with plain-Python logic underneath.

Every widget here is a thin shell around a controller object: the slider's observer only calls
the controller's ``update``, which uses the same library functions as the notebook's code cells
(``select_heads``, ``apply_plan``, ``count_parameters``, ``latency``). Tests set ``.value`` on the
slider without a browser and assert on what the controller computed.

* :func:`head_pruning_explorer`: a fraction slider -> head plan from precomputed scores -> plan
  heatmap, parameters, measured latency and accuracy of the pruned copy (cached per fraction).
* :func:`plan_matrix` / :func:`plot_plan`: the kept / removed heads of a plan as a
  ``[layers, heads]`` picture.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from .evaluate import count_parameters, latency
from .plan import PruningPlan
from .pruned_modeling import adapter_for
from .selection import select_heads, selection_info
from .surgery import apply_plan, parameters_removed
from .viz import show_in

__all__ = ["HeadPruningExplorer", "PruneResult", "head_pruning_explorer", "plan_matrix", "plot_plan"]


# ----------------------------------------------------------------------------- plan pictures


def plan_matrix(model: nn.Module, plan: PruningPlan) -> np.ndarray:
    """``[L, H_max]`` float array: 1 = query head kept, 0 = removed, NaN = no such head.

    Indices are those of ``model`` (the unpruned model the plan refers to); a layer removed
    whole is all zeros.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    n_q = [adapter.num_heads(b) for b in blocks]
    out = np.full((len(blocks), max(n_q)), np.nan)
    for layer, n in enumerate(n_q):
        out[layer, :n] = 0.0
        if layer in plan.layers:
            continue
        kept, _ = plan.kept_heads(model, layer)
        out[layer, kept] = 1.0
    return out


def plot_plan(model: nn.Module, plan: PruningPlan, ax=None, title: str | None = None):
    """Heatmap of :func:`plan_matrix` with KV-group boundaries drawn for GQA models."""
    matrix = plan_matrix(model, plan)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.45 * matrix.shape[1] + 1.5), max(2.2, 0.3 * matrix.shape[0] + 1)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    group = adapter.num_heads(block) // adapter.num_kv_heads(block)
    if group > 1:
        for x in np.arange(group, matrix.shape[1], group) - 0.5:
            ax.axvline(x, color="black", lw=1.5)
    ax.set_xlabel("query head" + (f" (KV groups of {group})" if group > 1 else ""))
    ax.set_ylabel("layer")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]))
    removed = int(np.nansum(matrix == 0))
    total = int(np.sum(~np.isnan(matrix)))
    ax.set_title(title or f"kept (green) / removed (red): {removed} of {total} heads removed")
    return ax


# ----------------------------------------------------------------------------- explorer


@dataclass
class PruneResult:
    """What one slider position computed."""

    fraction: float
    plan: PruningPlan
    requested_heads: int
    removed_heads: int
    params_removed: int  # from the plan's arithmetic (surgery.parameters_removed)
    params: int  # counted on the pruned copy
    latency_ms: float | None
    quality: float | None
    matrix: np.ndarray = field(repr=False)


class HeadPruningExplorer:
    """Controller behind the head-pruning slider; usable (and tested) without a browser.

    ``scores``: precomputed ``[L, H]`` head scores of ``model``. For a slider value ``f`` it
    selects ``select_heads(model, scores, fraction=f, **select_kwargs)``, prunes a deep copy
    with ``apply_plan``, and measures the copy: parameters (``count_parameters``), latency
    (``evaluate.latency(copy, **latency_kwargs)``, median ms; skipped when ``latency_kwargs`` is
    None) and ``quality(copy)`` (e.g. accuracy; skipped when None). Results are cached per
    fraction (rounded to 4 decimals), so returning to a position is instant; ``measurements``
    counts the pruned copies actually built. ``model`` is never changed.
    """

    def __init__(self, model: nn.Module, scores: torch.Tensor, *,
                 quality: Callable[[nn.Module], float] | None = None, quality_label: str = "accuracy",
                 latency_kwargs: dict | None = None, select_kwargs: dict | None = None,
                 max_fraction: float = 0.75, step: float = 0.05, draw: bool = True):
        import ipywidgets as widgets

        self.model = model
        self.scores = torch.as_tensor(scores)
        self.quality = quality
        self.quality_label = quality_label
        self.latency_kwargs = None if latency_kwargs is None else dict(latency_kwargs)
        self.select_kwargs = dict(select_kwargs or {})
        self.draw = draw
        self.cache: dict[float, PruneResult] = {}
        self.measurements = 0
        self.base_params = count_parameters(model)
        self.figure = None
        self.slider = widgets.FloatSlider(value=0.0, min=0.0, max=max_fraction, step=step,
                                          description="fraction", continuous_update=False,
                                          readout_format=".2f", style={"description_width": "initial"})
        self.label = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([self.slider, self.label, self.output])
        self.current: PruneResult | None = None
        self.slider.observe(self._on_change, names="value")
        self.update(self.slider.value)

    # -- logic ----------------------------------------------------------------------------------
    @staticmethod
    def key(fraction: float) -> float:
        return round(float(fraction), 4)

    def plan_for(self, fraction: float) -> tuple[PruningPlan, int]:
        """(plan, requested heads) for ``fraction`` as given (only the cache key is rounded); rounding
        warnings are recorded, not shown."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            plan = select_heads(self.model, self.scores, fraction=float(fraction), **self.select_kwargs)
        infos = selection_info(plan)
        requested = infos[0]["requested"] if infos else 0
        return plan, requested

    def result(self, fraction: float) -> PruneResult:
        """The (cached) measurements for ``fraction``."""
        key = self.key(fraction)
        if key in self.cache:
            return self.cache[key]
        plan, requested = self.plan_for(fraction)  # the value itself: 0.0833 x 72 heads would floor to 5, not 6
        matrix = plan_matrix(self.model, plan)
        removed = int(np.sum(matrix == 0))
        if removed == 0:
            pruned = self.model  # nothing to cut: measure the model itself, no copy
        else:
            pruned = apply_plan(copy.deepcopy(self.model), plan)
        self.measurements += 1
        lat = None
        if self.latency_kwargs is not None:
            lat = latency(pruned, **self.latency_kwargs)["median_ms"]
        qual = None if self.quality is None else float(self.quality(pruned))
        result = PruneResult(fraction=key, plan=plan, requested_heads=requested, removed_heads=removed,
                             params_removed=parameters_removed(self.model, plan),
                             params=count_parameters(pruned), latency_ms=lat, quality=qual,
                             matrix=matrix)
        del pruned
        self.cache[key] = result
        return result

    def update(self, fraction: float) -> PruneResult:
        self.current = self.result(fraction)
        self.label.value = self.describe(self.current)
        if self.draw:
            self._redraw()
        return self.current

    def _on_change(self, change) -> None:
        self.update(change["new"])

    def describe(self, r: PruneResult) -> str:
        base = self.cache.get(0.0)
        parts = [f"fraction {r.fraction:.2f}: {r.removed_heads} heads removed (requested {r.requested_heads})",
                 f"parameters {r.params:,} ({r.params_removed:,} removed, "
                 f"{r.params_removed / self.base_params:.1%} of the model)"]
        if r.latency_ms is not None:
            rel = f" ({base.latency_ms / r.latency_ms:.2f}x vs dense)" if base and base.latency_ms else ""
            parts.append(f"latency {r.latency_ms:.1f} ms{rel}")
        if r.quality is not None:
            rel = f" (dense {base.quality:.3f})" if base and base.quality is not None else ""
            parts.append(f"{self.quality_label} {r.quality:.3f}{rel}")
        return "<br>".join(parts)

    # -- view -----------------------------------------------------------------------------------
    def _redraw(self) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        plot_plan(self.model, self.current.plan, ax=ax,
                  title=f"fraction {self.current.fraction:.2f}: {self.current.removed_heads} heads removed")
        self.figure = show_in(self.output, fig)


def head_pruning_explorer(model: nn.Module, scores: torch.Tensor, **kwargs):
    """``(widget, explorer)``: display ``widget``; drive or inspect ``explorer`` from code.

    Keyword arguments go to :class:`HeadPruningExplorer` (``quality``, ``latency_kwargs``,
    ``select_kwargs``, ``max_fraction``, ``step``, ``draw``).
    """
    explorer = HeadPruningExplorer(model, scores, **kwargs)
    return explorer.widget, explorer
