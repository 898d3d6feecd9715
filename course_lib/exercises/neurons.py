"""MLP neurons (notebook 05): exercise checks, score comparisons, a latency comparison, a widget.

Checks
    :func:`check_wanda_scores`: a learner's per-neuron Wanda score from the down projection's
    weight and the activations entering it, judged against an independent computation and
    ``importance.neuron_scores(model, calib, "wanda")``; common slips are named.
    :func:`check_gated_neuron_parameters`: the parameters a neuron plan removes from a gated
    (Llama-family) MLP, judged against ``surgery.parameters_removed`` (and, given the pruned
    model, against the parameters it really lost).

Helpers
    :func:`mlp_inputs` captures the activations entering the down projection (real tokens only);
    :func:`layer_normalised` divides each layer's scores by their median (so layers become
    comparable for a global ranking); :func:`bottom_overlap` and :func:`dead_shares` summarise
    score vectors; :func:`uniform_plan` keeps the same number of neurons in every layer;
    :func:`mlp_widths` lists the widths; :func:`compare_latency` times several models in
    interleaved rounds and reports medians and ratios from the same run;
    :class:`DeadNeuronExplorer` / :func:`dead_neuron_explorer` is the threshold widget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import CheckFailed, check
from ..selection import layer_normalised as selection_layer_normalised
from ..viz import show_in

__all__ = [
    "DeadNeuronExplorer",
    "bottom_overlap",
    "check_down_refit",
    "check_gated_neuron_parameters",
    "check_wanda_scores",
    "compare_latency",
    "dead_neuron_explorer",
    "dead_shares",
    "layer_normalised",
    "mlp_inputs",
    "mlp_widths",
    "uniform_plan",
]


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def mlp_inputs(model: nn.Module, calib, layers: Sequence[int], *, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """``{layer: X [tokens, intermediate]}``: the activations entering each listed layer's down
    projection (``act(gate x) * up x`` for gated MLPs, ``act(W_in x + b)`` otherwise), real tokens
    only, float32 on the CPU. Meant for small calibration sets: it keeps every token."""
    from ..importance._calibration import forward_base, iterate, make_batches, pad_id, scoring_session, token_mask
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    layers = [int(i) for i in layers]
    batches = make_batches(calib, batch_size, pad_id(model))
    chunks: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    state: dict = {}

    def make_hook(layer):
        def hook(module, args):
            chunks[layer].append(args[0][state["mask"]].detach().float().cpu())

        return hook

    with scoring_session(model) as handles:
        for layer in layers:
            handles.append(adapter.mlp_out(blocks[layer]).register_forward_pre_hook(make_hook(layer)))
        for batch in iterate(batches, model, False, "mlp inputs"):
            state["mask"] = token_mask(batch)
            forward_base(model, batch)
    return {i: torch.cat(c) for i, c in chunks.items()}


def mlp_widths(model: nn.Module) -> list[int]:
    """Every layer's intermediate (MLP) width."""
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(model)
    return [adapter.intermediate_size(b) for b in adapter.blocks(model)]


def layer_normalised(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``selection.layer_normalised`` (each layer's scores over their median), as an exercise check."""
    try:
        return selection_layer_normalised(list(scores))
    except ValueError as error:
        raise CheckFailed(str(error)) from None


def bottom_overlap(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], fraction: float = 0.25) -> torch.Tensor:
    """``[L]``: per layer, the share of ``a``'s lowest ``fraction`` of neurons that are also among
    ``b``'s lowest ``fraction`` (independent random scores give about ``fraction``)."""
    out = []
    for x, y in zip(a, b):
        k = max(1, int(round(fraction * len(x))))
        low_x = set(torch.argsort(torch.as_tensor(x), stable=True)[:k].tolist())
        low_y = set(torch.argsort(torch.as_tensor(y), stable=True)[:k].tolist())
        out.append(len(low_x & low_y) / k)
    return torch.tensor(out)


def dead_shares(frequencies: Sequence[torch.Tensor], threshold: float) -> torch.Tensor:
    """``[L]``: per layer, the share of neurons whose activation frequency is below ``threshold``."""
    return torch.tensor([float((torch.as_tensor(f) < threshold).float().mean()) for f in frequencies])


def uniform_plan(model: nn.Module, scores: Sequence[torch.Tensor], keep: int):
    """A plan keeping the ``keep`` highest-scored neurons of every layer (ties: lower index kept)."""
    from ..plan import PruningPlan

    widths = mlp_widths(model)
    neurons = {}
    for layer, (s, n) in enumerate(zip(scores, widths)):
        check(len(s) == n, f"layer {layer}: {len(s)} scores for {n} neurons")
        check(0 < keep <= n, f"keep={keep} must be in [1, {n}]")
        if keep < n:
            order = torch.argsort(torch.as_tensor(s, dtype=torch.float64), stable=True)
            neurons[layer] = sorted(order[: n - keep].tolist())
    plan = PruningPlan(neurons=neurons)
    plan.validate(model)
    return plan


def compare_latency(models: dict[str, nn.Module], *, rounds: int = 3, **latency_kwargs) -> dict[str, dict]:
    """Time every model ``rounds`` times in interleaved order (A, B, C, A, B, C, ...) with
    ``evaluate.latency`` and keep, per model, the median of its per-round medians.

    Interleaving spreads slow phases of a busy machine over all models instead of one. Returns
    ``{name: {"median_ms", "speedup"}}``, speedup relative to the first model (> 1 = faster).
    """
    from ..evaluate import latency

    check(len(models) > 0, "models is empty")
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(latency(model, **latency_kwargs)["median_ms"])
    medians = {name: float(torch.tensor(v).median()) for name, v in per_round.items()}
    first = next(iter(medians.values()))
    return {name: {"median_ms": m, "speedup": first / m, "rounds_ms": per_round[name]} for name, m in medians.items()}


# ----------------------------------------------------------------------------- exercise: Wanda


def _wanda_variants(w_down: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    w, x = w_down.double(), x.double()
    norm = x.norm(dim=0)
    return {
        "right": w.abs().sum(0) * norm,
        "squared norm": w.abs().sum(0) * (x ** 2).sum(0),
        "mean abs": w.abs().sum(0) * x.abs().mean(0),
        "rms": w.abs().sum(0) * norm / math.sqrt(x.shape[0]),
        "column L2": w.norm(dim=0) * norm,
        "no abs": w.sum(0) * norm,
        "weights only": w.abs().sum(0),
        "activations only": norm,
        "sum abs activations": w.abs().sum(0) * x.abs().sum(0),
    }


_WANDA_HINTS = {
    "squared norm": "you used the sum of squares of the activations; Wanda takes their L2 norm, its square root",
    "mean abs": "you used the mean |activation|; Wanda takes the L2 norm over the tokens, sqrt(sum_t x_tn^2)",
    "rms": "you used the root-mean-square (norm / sqrt(tokens)); Wanda takes the plain L2 norm (it does not "
           "divide by the number of tokens; the ranking is the same but the values are not)",
    "column L2": "you took the L2 norm of the weight column; Wanda sums |W_ij| * ||X_j|| over the weights, "
                 "so the weight part is the sum of absolute values of column n",
    "no abs": "the weights need absolute values: sum_i |W_down[i, n]|, or positive and negative weights cancel",
    "weights only": "that is the weight part alone: multiply by the activation norm ||X[:, n]||_2",
    "activations only": "that is the activation norm alone: multiply by sum_i |W_down[i, n]|",
    "sum abs activations": "you summed |activations| (an L1 norm); Wanda uses the L2 norm over the tokens",
}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-8)


def check_wanda_scores(fn: Callable, model: nn.Module, calib, layers: Sequence[int] = (0, 14, -1)) -> dict:
    """Check ``fn(w_down, x) -> Tensor[intermediate]``: the Wanda score of every neuron of a layer.

    ``w_down`` is the down (output) projection's weight ``[hidden, intermediate]``; ``x`` the
    activations entering it, ``[tokens, intermediate]``. The answer,
    ``score_n = sum_i |w_down[i, n]| * ||x[:, n]||_2``, is computed here independently and checked
    against ``importance.neuron_scores(model, calib, "wanda")``. Returns ``{layer: scores}``.
    """
    from ..importance import neuron_scores
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    layers = sorted({i % len(blocks) for i in layers})
    reference = neuron_scores(model, calib, "wanda", progress=False)
    activations = mlp_inputs(model, calib, layers)
    out = {}
    for layer in layers:
        w_down = adapter.mlp_out(blocks[layer]).weight.detach()
        x = activations[layer]
        n = w_down.shape[1]
        variants = _wanda_variants(w_down, x)
        check(_close(variants["right"].float(), reference[layer]),
              f"internal: the check's Wanda scores disagree with importance.neuron_scores at layer {layer}")
        with torch.no_grad():
            got = fn(w_down.clone(), x.clone())
        check(isinstance(got, torch.Tensor), f"layer {layer}: return a torch.Tensor, got {type(got).__name__}")
        got = got.detach()
        if tuple(got.shape) != (n,):
            hint = "one score per neuron (per column of w_down)"
            if tuple(got.shape) == (w_down.shape[0],):
                hint = (f"({w_down.shape[0]},) is the hidden size: you reduced over the wrong axis. w_down is "
                        f"[hidden, intermediate] = {tuple(w_down.shape)}; neuron n is COLUMN n, so sum over dim 0")
            elif got.dim() == 2:
                hint = "sum the per-weight scores |W_in| * ||X_n|| over the rows i to get one score per neuron"
            check(False, f"layer {layer}: shape {tuple(got.shape)} but expected ({n},): {hint}")
        check(bool(torch.isfinite(got).all()), f"layer {layer}: the scores hold NaN or inf")
        if not _close(got, variants["right"]):
            for name, value in variants.items():
                if name != "right" and _close(got, value):
                    check(False, f"layer {layer}: {_WANDA_HINTS[name]}")
            bad = int((got.double() - variants["right"]).abs().argmax())
            check(False, f"layer {layer}, neuron {bad}: got {float(got[bad]):.5g} but expected "
                         f"{float(variants['right'][bad]):.5g} = sum_i |w_down[i, {bad}]| * ||x[:, {bad}]||_2")
        out[layer] = got.float()
    print(f"check_wanda_scores: layers {layers} match importance.neuron_scores(..., 'wanda')")
    return out


# ----------------------------------------------------------------------------- exercise: parameters


def check_gated_neuron_parameters(fn: Callable, model: nn.Module, plan, pruned: nn.Module | None = None) -> int:
    """Check ``fn(plan, hidden_size) -> int``: parameters a neurons-only plan removes from a gated
    MLP model without MLP biases (Llama family). Compared with ``surgery.parameters_removed`` and,
    when ``pruned`` (the model after ``apply_plan``) is given, with the parameters it lost."""
    from ..evaluate import count_parameters
    from ..pruned_modeling import adapter_for
    from ..surgery import parameters_removed

    check(not plan.layers and not plan.heads and not plan.kv_groups,
          "this exercise counts a neurons-only plan: the plan also has layers, heads or kv_groups")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    ins = adapter.mlp_in(block)
    check(len(ins) == 2 and all(lin.bias is None for lin in ins + [adapter.mlp_out(block)]),
          "this exercise is for gated MLPs without biases (SmolLM2 / Llama): gate, up and down projections")
    hidden = ins[0].in_features
    expected = parameters_removed(model, plan)
    if pruned is not None:
        lost = count_parameters(model) - count_parameters(pruned)
        check(lost == expected, f"internal: parameters_removed ({expected:,}) differs from the pruned model ({lost:,})")
    got = fn(plan, hidden)
    check(isinstance(got, int) or (isinstance(got, torch.Tensor) and got.numel() == 1),
          f"return an int, got {type(got).__name__}")
    got = int(got)
    n = sum(len(v) for v in plan.neurons.values())
    if got != expected:
        hints = {
            n * hidden: "you counted one vector per neuron; a gated neuron owns a row of gate, a row of up and a "
                        "column of down: 3 * hidden_size parameters",
            2 * n * hidden: "you counted two projections (a plain MLP's in and out); a gated MLP also has the gate "
                            "projection, with one row per neuron",
            3 * n * hidden + n: "Llama-family MLPs have no biases: do not add one per neuron",
            3 * n * hidden + 2 * n: "Llama-family MLPs have no biases: do not add any",
            n: "you counted neurons, not parameters: each removed neuron takes 3 * hidden_size parameters",
        }
        hint = hints.get(got, f"the plan removes {n:,} neurons of 3 * {hidden} = {3 * hidden:,} parameters each")
        check(False, f"got {got:,} parameters but the plan removes {expected:,}: {hint}")
    print(f"check_gated_neuron_parameters: {got:,} parameters, matching parameters_removed"
          + (" and the pruned model" if pruned is not None else ""))
    return expected


# ----------------------------------------------------------------------------- exercise: refit down_proj


def _relative_error(x_kept: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> float:
    """``||x_kept W'^T - target||^2 / ||target||^2``: the share of the dense output a refit misses."""
    return float((x_kept @ weight.T - target).pow(2).sum() / target.pow(2).sum())


def _refit_variants(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """The right solution and the slips it is confused with, all ``[hidden, kept]`` float64.

    Right: ``min ||x_kept W'^T - x w^T||^2 + lam ||W' - w[:, keep]||^2``, the ridge pulling toward
    the sliced weight, which is what ``reconstruction.refit`` solves (it damps the whole Gram matrix).
    """
    x_kept, sliced = x[:, keep], w[:, keep]
    gram = x_kept.T @ x_kept
    ridge = gram + lam * torch.eye(len(keep), dtype=x.dtype)
    dense_target = x_kept.T @ (x @ w.T)
    return {
        "right": torch.linalg.solve(ridge, dense_target + lam * sliced.T).T,
        "toward zero": torch.linalg.solve(ridge, dense_target).T,
        "no ridge": torch.linalg.lstsq(x_kept, x @ w.T, driver="gelsd").solution.T,
        "pruned target": torch.linalg.solve(ridge, gram @ sliced.T).T,
        "sliced": sliced,
    }


_REFIT_HINTS = {
    "toward zero": "your ridge pulls W' toward zero (lam * ||W'||^2); this one pulls it toward the sliced weight, "
                   "lam * ||W' - w_down[:, keep]||^2, so add lam * w_down[:, keep].T to the right-hand side. With "
                   "few tokens the refit then stays near the pruned layer instead of shrinking its outputs",
    "no ridge": "that is the plain least-squares solution: add lam * I to the kept Gram matrix x_kept^T x_kept "
                "(and lam * w_down[:, keep].T to the right-hand side). The ridge keeps the fit stable when neurons "
                "are correlated or there are few tokens per kept neuron",
    "pruned target": "you fitted the pruned layer's own outputs, x_kept @ w_down[:, keep].T; the target is the "
                     "dense layer's output on the same tokens, x @ w_down.T, which the removed neurons contributed to",
    "sliced": "that is w_down[:, keep], the pruned weight unchanged: either nothing was refitted, or the target was "
              "the pruned layer's own output (whose best fit is itself); the target is the dense output x @ w_down.T",
}


def check_down_refit(fn: Callable, model: nn.Module, calib, *, layer: int = 14, keep_share: float = 0.75,
                     fit_windows: int | None = None, ridge: float | None = None) -> dict:
    """Check ``fn(w_down, x, keep, lam) -> Tensor[hidden, kept]``: the ridge least-squares refit of
    one layer's down (output) projection after its MLP keeps only the neurons ``keep``.

    ``w_down`` is the dense weight ``[hidden, intermediate]``, ``x`` the activations entering it on
    calibration tokens ``[tokens, intermediate]``, ``keep`` the kept neuron indices and ``lam`` the
    ridge (``ridge`` times the mean diagonal of ``x^T x``, as ``course_lib.reconstruction`` damps).
    The answer minimises ``||x[:, keep] W'^T - x w_down^T||^2 + lam ||W' - w_down[:, keep]||^2``
    (no bias here; the library also fits one). ``keep`` is the ``keep_share`` of the layer's neurons
    with the highest Wanda score; the fit uses the first ``fit_windows`` windows of ``calib``
    (default: all but a quarter) and the rest are held out. Returns the layer, the token counts, ``lam`` and the
    held-out relative output error (:func:`_relative_error`) of the sliced weight, of the refit
    without a ridge (for comparison) and of the learner's refit.
    """
    from ..pruned_modeling import adapter_for
    from ..reconstruction import DEFAULT_RIDGE, Gram, refit

    ridge = DEFAULT_RIDGE if ridge is None else ridge
    check(ridge > 0, f"ridge must be positive, got ridge={ridge}")
    check(0 < keep_share < 1, f"keep_share must be strictly between 0 and 1, got keep_share={keep_share}")
    windows = len(calib)
    fit_windows = max(1, windows - windows // 4) if fit_windows is None else fit_windows
    check(0 < fit_windows < windows, f"fit_windows={fit_windows} must leave held-out windows of the {windows} given")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    layer %= len(blocks)
    linear = adapter.mlp_out(blocks[layer])
    w = linear.weight.detach().double().cpu()
    x_fit = mlp_inputs(model, calib[:fit_windows], [layer])[layer].double()
    x_test = mlp_inputs(model, calib[fit_windows:], [layer])[layer].double()
    n = w.shape[1]
    wanda = w.abs().sum(0) * x_fit.norm(dim=0)
    keep = torch.argsort(wanda, descending=True)[: max(1, round(keep_share * n))].sort().values
    lam = ridge * float(torch.diagonal(x_fit.T @ x_fit).mean())
    variants = _refit_variants(w, x_fit, keep, lam)

    gram = Gram(n, linear.weight.device)  # the library's refit, token weights 1 and no bias: the same solution
    gram.add(x_fit.to(linear.weight.device), torch.ones(len(x_fit), device=linear.weight.device))
    library, _ = refit(linear, gram, keep, ridge, intercept=False)
    check(torch.allclose(library.cpu(), variants["right"], rtol=1e-6, atol=1e-9),
          "internal: the closed form disagrees with course_lib.reconstruction.refit")

    shapes = (f"w_down is [hidden, intermediate] = {tuple(w.shape)}, x is [tokens, intermediate] = "
              f"{tuple(x_fit.shape)}")
    try:
        with torch.no_grad():
            got = fn(linear.weight.detach().clone().float().cpu(), x_fit.float().clone(), keep.clone(), lam)
    except torch.linalg.LinAlgError as error:
        raise CheckFailed(f"the solve failed ({str(error).splitlines()[0]}): x_kept^T x_kept is singular or nearly "
                          f"so ({len(x_fit)} tokens for {len(keep)} kept neurons); add lam * I to it") from None
    except RuntimeError as error:
        if "shape" not in str(error) and "size" not in str(error):
            raise
        raise CheckFailed(f"a matrix product failed ({str(error).splitlines()[0]}): {shapes}; the dense outputs "
                          f"are x @ w_down.T and the kept activations x[:, keep]") from None
    check(isinstance(got, torch.Tensor), f"return a torch.Tensor, got {type(got).__name__}")
    got = got.detach().double().cpu()
    expected_shape = (w.shape[0], len(keep))
    if tuple(got.shape) != expected_shape:
        hint = "one row per output feature (hidden), one column per kept neuron, like nn.Linear's weight"
        if tuple(got.shape) == expected_shape[::-1]:
            hint = ("that is the transpose: solving the normal equations gives W'^T [kept, hidden]; nn.Linear "
                    "stores [out_features, in_features], so return its .T")
        check(False, f"shape {tuple(got.shape)} but expected {expected_shape}: {hint}")
    check(bool(torch.isfinite(got).all()), "the weight holds NaN or inf: was the system singular? add lam * I")

    def close(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-3  # float32 arithmetic passes

    if not close(got, variants["right"]):
        for name, value in variants.items():
            if name != "right" and close(got, value):
                check(False, _REFIT_HINTS[name])
        off = float((got - variants["right"]).norm() / variants["right"].norm())
        check(False, f"the weight is {off:.2%} away from the solution of min ||x_kept W'^T - x w_down^T||^2 + "
                     f"lam ||W' - w_down[:, keep]||^2, i.e. W'^T = (x_kept^T x_kept + lam I)^-1 "
                     f"(x_kept^T x w_down^T + lam w_down[:, keep]^T)")
    target = x_test @ w.T
    errors = {"sliced": _relative_error(x_test[:, keep], w[:, keep], target),
              "no ridge": _relative_error(x_test[:, keep], variants["no ridge"], target),
              "refit": _relative_error(x_test[:, keep], got, target)}
    print(f"check_down_refit: layer {layer}, {len(keep)} of {n} neurons kept, fitted on {len(x_fit):,} tokens: "
          f"matches the ridge least-squares solution")
    return {"layer": layer, "kept": len(keep), "neurons": n, "fit_tokens": len(x_fit), "test_tokens": len(x_test),
            "lam": lam, "heldout_error": errors}


# ----------------------------------------------------------------------------- widget


@dataclass
class DeadShare:
    """What one widget position computed."""

    model: str
    eps: float
    threshold: float
    per_layer: torch.Tensor = field(repr=False)
    total: float = 0.0  # share of all neurons of the model below the threshold
    count: int = 0


class DeadNeuronExplorer:
    """Controller of the near-dead-neuron widget; plain Python, usable (and tested) without a browser.

    ``frequencies``: ``{model name: {eps: [per-layer activation frequencies]}}``, computed with
    ``importance.neuron_scores(..., "activation_frequency", eps=eps)``. A neuron counts as near-dead
    when its frequency is below ``threshold``; the explorer reports the share per layer and overall.
    """

    def __init__(self, frequencies: dict, *, thresholds: Sequence[float] = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5),
                 draw: bool = True):
        import ipywidgets as widgets

        check(len(frequencies) > 0 and all(len(v) > 0 for v in frequencies.values()),
              "frequencies must be {model: {eps: [per-layer tensors]}}, non-empty")
        self.frequencies = frequencies
        self.draw = draw
        self.figure = None
        first = next(iter(frequencies))
        self.model_box = widgets.Dropdown(options=list(frequencies), value=first, description="model")
        self.eps_box = widgets.Dropdown(options=sorted(frequencies[first]), description="eps")
        self.threshold = widgets.SelectionSlider(options=list(thresholds), value=thresholds[1],
                                                 description="dead if freq <", continuous_update=False,
                                                 style={"description_width": "initial"})
        self.label = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.model_box, self.eps_box, self.threshold]), self.label,
                                    self.output])
        self.current: DeadShare | None = None
        self.model_box.observe(self._on_model, names="value")
        self.eps_box.observe(self._on_change, names="value")
        self.threshold.observe(self._on_change, names="value")
        self.update(first, self.eps_box.value, self.threshold.value)

    def compute(self, model: str, eps: float, threshold: float) -> DeadShare:
        freqs = self.frequencies[model][eps]
        per_layer = dead_shares(freqs, threshold)
        count = int(sum(int((torch.as_tensor(f) < threshold).sum()) for f in freqs))
        total = count / sum(len(f) for f in freqs)
        return DeadShare(model, eps, threshold, per_layer, total, count)

    def update(self, model: str, eps: float, threshold: float) -> DeadShare:
        self.current = c = self.compute(model, eps, threshold)
        self.label.value = (f"{c.model}, |activation| &gt; {c.eps:g} counts as active: {c.count:,} neurons "
                            f"({c.total:.2%}) are active on fewer than {c.threshold:.1%} of the tokens")
        if self.draw:
            self._redraw()
        return c

    def _on_model(self, change) -> None:
        options = sorted(self.frequencies[change["new"]])
        eps = self.eps_box.value if self.eps_box.value in options else options[0]
        self.eps_box.unobserve(self._on_change, names="value")
        self.eps_box.options = options
        self.eps_box.value = eps
        self.eps_box.observe(self._on_change, names="value")
        self._on_change(None)

    def _on_change(self, change) -> None:
        self.update(self.model_box.value, self.eps_box.value, self.threshold.value)

    def _redraw(self) -> None:
        import matplotlib.pyplot as plt
        c = self.current
        fig, ax = plt.subplots(figsize=(7, 2.6))
        ax.bar(range(len(c.per_layer)), c.per_layer.numpy())
        ax.set(xlabel="layer", ylabel="near-dead share", ylim=(0, max(0.05, float(c.per_layer.max()) * 1.1)),
               title=f"{c.model}: frequency < {c.threshold:g} at eps {c.eps:g}")
        self.figure = show_in(self.output, fig)


def dead_neuron_explorer(frequencies: dict, **kwargs):
    """``(widget, explorer)``: display ``widget``; drive or inspect ``explorer`` from code."""
    explorer = DeadNeuronExplorer(frequencies, **kwargs)
    return explorer.widget, explorer
