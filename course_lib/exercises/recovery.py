"""Notebook 06 (recovery fine-tuning): the distillation-loss exercise, readings of the Trainer's log, and a
widget to compare recovery runs.

The runs themselves are ``recovery.fine_tune``, the same function the pipeline calls; this module
only reads what it returns (``log_history``: the Trainer's per-step records).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import check


def gap_closed(dense: float, pruned: float, recovered: float) -> float:
    """The share of the pruning gap that recovery won back: 0 = none, 1 = all (either direction of "better")."""
    check(dense != pruned, f"dense and pruned are equal ({dense}): there is no gap to close")
    return (recovered - pruned) / (dense - pruned)


def validation_curve(log_history: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, validation losses) of the evaluations during training."""
    rows = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return [s for s, _ in rows], [loss for _, loss in rows]


def learning_rate_schedule(log_history: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, learning rates) the optimizer used, one per logged training step."""
    rows = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    return [s for s, _ in rows], [lr for _, lr in rows]


def _reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, *, soften: bool = True,
                  direction: str = "teacher", scale: bool = True) -> torch.Tensor:
    t = temperature if soften else 1.0
    s = torch.log_softmax(student.double() / t, -1).flatten(0, -2)
    q = torch.log_softmax(teacher.double() / t, -1).flatten(0, -2)
    p, r = (q, s) if direction == "teacher" else (s, q)  # KL(p || r)
    kl = (p.exp() * (p - r)).sum(-1).mean()
    return kl * temperature ** 2 if scale else kl


def check_distillation_loss(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Compare ``fn(student_logits, teacher_logits, temperature)`` with ``recovery.distillation_loss`` on
    random logits of shape [batch, positions, vocabulary] at several temperatures, and name the mistake."""
    from ..recovery import distillation_loss

    generator = torch.Generator().manual_seed(0)
    student, teacher = (3 * torch.randn(2, 5, 11, generator=generator) for _ in range(2))
    for temperature in (1.0, 2.0, 4.0):
        got = fn(student.clone(), teacher.clone(), temperature)
        check(isinstance(got, torch.Tensor) and got.dim() == 0,
              f"return a scalar tensor (the mean over positions), got {got!r:.80}")
        got = float(got)
        want = float(distillation_loss(student, teacher, temperature))
        tolerance = 1e-4 * max(1.0, abs(want))  # one tolerance for every comparison below

        def matches(value: float) -> bool:
            return abs(got - value) <= tolerance

        if matches(want):
            continue
        known = {
            "multiply by temperature ** 2: softened targets give gradients 1/T^2 as large (Hinton et al. 2015), "
            "and the T^2 keeps the loss on the scale of the unsoftened one": dict(scale=False),
            "the KL is the wrong way round: the teacher's softened distribution is the target, "
            "KL(teacher || student)": dict(direction="student"),
            "soften both distributions: divide the student's and the teacher's logits by the temperature before "
            "the softmax": dict(soften=False),
        }
        for message, variant in known.items():
            check(not matches(float(_reference_kl(student, teacher, temperature, **variant))),
                  f"at temperature {temperature}: {message}")
        per_element = float(_reference_kl(student, teacher, temperature)) / student.shape[-1]
        check(not matches(per_element), f"at temperature {temperature}: sum the KL over the vocabulary and "
                                         "average over positions (batch x positions), not over every element")
        check(False, f"at temperature {temperature}: expected {want:.6f}, got {got:.6f}")


@dataclass
class RunView:
    name: str
    best_eval_loss: float
    steps: int
    planned_steps: int
    stopped_early: bool
    quality: float | None


class RecoveryRunExplorer:
    """Pick a recovery run: its validation curve and learning-rate schedule, next to every other run's curve.

    ``runs``: ``{name: fine_tune's summary}``, optionally with a ``"quality"`` entry (the test figure).
    """

    def __init__(self, runs: dict[str, dict], *, quality_name: str = "quality", draw: bool = True):
        import ipywidgets as widgets

        check(len(runs) > 0 and all("log_history" in r for r in runs.values()),
              "runs must be {name: fine_tune's summary} (each with a log_history), non-empty")
        self.runs, self.quality_name, self.draw, self.figure = runs, quality_name, draw, None
        self.choice = widgets.ToggleButtons(options=list(runs), description="run")
        self.label = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([self.choice, self.label, self.output])
        self.current: RunView | None = None
        self.choice.observe(lambda change: self.update(change["new"]), names="value")
        self.update(self.choice.value)

    def update(self, name: str) -> RunView:
        check(name in self.runs, f"run {name!r} is unknown; choose one of {list(self.runs)}")
        r = self.runs[name]
        self.current = v = RunView(name, r["best_eval_loss"], r["steps"], r["planned_steps"],
                                   r["steps"] < r["planned_steps"], r.get("quality"))
        stop = f"early stopping after {v.steps} of {v.planned_steps} steps" if v.stopped_early else \
            f"all {v.planned_steps} steps"
        shown = "" if v.quality is None else f"; test {self.quality_name} {v.quality:.4g}"
        self.label.value = f"{name}: best validation loss {v.best_eval_loss:.4f}, {stop}, kept {r['kept']}{shown}"
        if self.draw:
            self._redraw()
        return v

    def _redraw(self) -> None:
        import matplotlib.pyplot as plt

        from ..viz import show_in

        fig, (curves, schedule) = plt.subplots(1, 2, figsize=(11, 3))
        for name, r in self.runs.items():
            steps, losses = validation_curve(r["log_history"])
            chosen = name == self.current.name
            curves.plot([0, *steps], [r["initial_eval_loss"], *losses], "o-", ms=3, lw=2.5 if chosen else 1,
                        alpha=1 if chosen else 0.35, label=name)
        curves.set(xlabel="optimizer step", ylabel="validation loss", title="validation loss (step 0: before)")
        curves.legend(fontsize=7)
        steps, rates = learning_rate_schedule(self.runs[self.current.name]["log_history"])
        schedule.plot(steps, rates)
        schedule.set(xlabel="optimizer step", ylabel="learning rate", title=f"{self.current.name}: schedule")
        self.figure = show_in(self.output, fig)


def recovery_run_explorer(runs: dict[str, dict], **kwargs):
    """``(widget, explorer)``: display ``widget``; drive or inspect ``explorer`` from code."""
    explorer = RecoveryRunExplorer(runs, **kwargs)
    return explorer.widget, explorer
