"""Notebook 07 (iterative vs one-shot): head pruning in rounds with recovery in between, the re-scoring
readings, and the budget-split exercise.

``head_rounds`` is the pipeline's loop (``pipeline.run`` with ``steps > 1``) written out for attention
heads, so that a notebook can look inside it: it keeps every round's scores, mapped back to the
dense model's head indices, to test *why* iterative pruning should help (re-scoring after recovery
finds different heads), not only whether it does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..pipeline import split_budget  # the pipeline's split of a total over rounds
from . import check


def check_split(fn: Callable[[int, int], list[int]]) -> None:
    """Compare ``fn(total, rounds)`` with the pipeline's split and name what is wrong."""
    for total, rounds in ((12, 3), (10, 4), (7, 5), (3, 5), (36, 1), (48, 5)):
        got, want = list(fn(total, rounds)), split_budget(total, rounds)
        check(len(got) == rounds, f"({total}, {rounds}): return one count per round ({rounds}), got {len(got)}")
        check(sum(got) == total, f"({total}, {rounds}): the rounds must add up to {total}, they add up to {sum(got)}")
        check(max(got) - min(got) <= 1, f"({total}, {rounds}): spread as evenly as integers allow "
                                        f"(counts differ by at most 1), got {got}")
        check(got == want, f"({total}, {rounds}): the pipeline gives the larger shares to the later rounds: "
                           f"{want}, got {got}")


@dataclass
class Round:
    round: int
    removed: int  # heads removed so far
    sparsity: float  # share of the dense model's heads removed so far
    after_prune: float
    after_recovery: float | None
    tokens: int
    scores: torch.Tensor  # [L, H] this round's scores by the dense model's head index (NaN: removed earlier)
    removed_now: list[tuple[int, int]] = field(default_factory=list)  # (layer, dense head index) cut this round


def head_rounds(model: nn.Module, total: int, rounds: int, tokens: int, *, calib: Callable[[int], list],
                recover: Callable[[nn.Module, int, int], dict] | None, quality: Callable[[nn.Module], float],
                rules: dict, score: Callable[[nn.Module, list], torch.Tensor]) -> tuple[nn.Module, list[Round]]:
    """Remove ``total`` heads of a copy of ``model`` in ``rounds`` rounds, recovering ``tokens`` in all.

    Each round: score the heads now (``score(model, calib(round))``), remove its share
    (``split_budget``) with ``selection.select_heads(count=..., **rules)``, measure ``quality``, then
    ``recover(model, round_tokens, round)`` in place (skipped when ``recover`` is None or the round
    has no tokens) and measure again.
    """
    from ..pruned_modeling import adapter_for
    from ..selection import select_heads
    from ..surgery import apply_plan

    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    dense_heads = [list(range(adapter.num_heads(b))) for b in adapter.blocks(model)]
    n_dense = sum(len(h) for h in dense_heads)
    alive = copy.deepcopy(dense_heads)  # per layer: the dense indices of the heads still there, in order
    history, removed = [], 0
    for r, (count, budget) in enumerate(zip(split_budget(total, rounds), split_budget(tokens, rounds)), start=1):
        scores = score(model, calib(r))
        by_dense = torch.full((len(dense_heads), max(len(h) for h in dense_heads)), float("nan"))
        for layer, ids in enumerate(alive):
            by_dense[layer, ids] = scores[layer, : len(ids)].float()
        plan = select_heads(model, scores, count=count, **rules)
        cut = [(layer, alive[layer][h]) for layer, heads in sorted(plan.heads.items()) for h in heads]
        apply_plan(model, plan)
        for layer, heads in plan.heads.items():
            gone = set(heads)
            alive[layer] = [d for i, d in enumerate(alive[layer]) if i not in gone]
        removed += len(cut)
        after_prune = quality(model)
        after_recovery = None
        if recover is not None and budget:
            recover(model, budget, r)
            after_recovery = quality(model)
        history.append(Round(r, removed, removed / n_dense, after_prune, after_recovery, budget, by_dense, cut))
    return model, history


def survivor_correlation(first: torch.Tensor, later: torch.Tensor) -> float:
    """Spearman correlation of two rounds' scores over the heads present in both (NaN elsewhere)."""
    from ..importance import rank_correlation

    both = ~(first.isnan() | later.isnan())
    check(int(both.sum()) >= 3, "fewer than 3 heads are scored in both rounds")
    return float(rank_correlation(first[both], later[both]))


def risers(first: torch.Tensor, later: torch.Tensor, *, bottom: float = 0.5, top: float = 0.25) -> list[tuple]:
    """Heads in the ``bottom`` share of the first round's ranking (among those present in both) that
    reach the ``top`` share of the later round's: ``(layer, head, first rank share, later rank share)``."""
    both = ~(first.isnan() | later.isnan())
    idx = both.nonzero().tolist()
    a = torch.tensor([float(first[i, j]) for i, j in idx])
    b = torch.tensor([float(later[i, j]) for i, j in idx])
    share = lambda v: v.argsort().argsort().float() / max(len(v) - 1, 1)  # noqa: E731  (0 = lowest, 1 = highest)
    sa, sb = share(a), share(b)
    return [(i, j, float(x), float(y)) for (i, j), x, y in zip(idx, sa, sb) if x < bottom and y >= 1 - top]


@dataclass
class ScheduleView:
    rounds: int
    seed: int
    final: float
    trajectory: list[tuple[float, float]]  # (share removed, quality): dense, then after each prune and recovery


class ScheduleExplorer:
    """Slide through the schedules (rounds) and seeds of ``histories``: ``{(rounds, seed): [Round, ...]}``."""

    def __init__(self, histories: dict, dense: float, *, quality_name: str = "accuracy", draw: bool = True):
        import ipywidgets as widgets

        keys = list(histories)
        check(len(keys) > 0, "histories must hold {(rounds, seed): rounds of head_rounds}, non-empty")
        self.histories, self.dense, self.quality_name, self.draw, self.figure = histories, dense, quality_name, draw, None
        self.rounds = widgets.SelectionSlider(options=sorted({k[0] for k in keys}), description="rounds",
                                              continuous_update=False)
        self.seed = widgets.Dropdown(options=sorted({k[1] for k in keys}), description="seed")
        self.label = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.rounds, self.seed]), self.label, self.output])
        self.current: ScheduleView | None = None
        for control in (self.rounds, self.seed):
            control.observe(self._on_change, names="value")
        self.update(self.rounds.value, self.seed.value)

    def _on_change(self, change) -> None:
        if (self.rounds.value, self.seed.value) in self.histories:
            self.update(self.rounds.value, self.seed.value)
        else:  # not every schedule is repeated with every seed
            self.label.value = f"{self.rounds.value} round(s) were not run with seed {self.seed.value}"

    def update(self, rounds: int, seed: int) -> ScheduleView:
        check((rounds, seed) in self.histories, f"no run with rounds={rounds}, seed={seed}")
        h = self.histories[(rounds, seed)]
        points = [(0.0, self.dense)]
        for r in h:
            points += [(r.sparsity, r.after_prune)] + ([(r.sparsity, r.after_recovery)] if r.after_recovery is not None
                                                       else [])
        final = h[-1].after_recovery if h[-1].after_recovery is not None else h[-1].after_prune
        self.current = v = ScheduleView(rounds, seed, final, points)
        worst = min(q for _, q in points)
        self.label.value = (f"{rounds} round(s), seed {seed}: final {self.quality_name} {final:.3f} "
                            f"(dense {self.dense:.3f}); lowest point on the way {worst:.3f}")
        if self.draw:
            import matplotlib.pyplot as plt

            from ..viz import show_in

            fig, ax = plt.subplots(figsize=(7, 3))
            ax.plot(*zip(*points), "o-", ms=3)
            ax.axhline(self.dense, ls=":", c="gray")
            ax.set(xlabel="share of heads removed", ylabel=self.quality_name, title=f"{rounds} round(s), seed {seed}")
            self.figure = show_in(self.output, fig)
        return v


def schedule_explorer(histories: dict, dense: float, **kwargs):
    """``(widget, explorer)``: display ``widget``; drive or inspect ``explorer`` from code."""
    explorer = ScheduleExplorer(histories, dense, **kwargs)
    return explorer.widget, explorer
