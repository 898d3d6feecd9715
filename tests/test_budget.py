"""The budget planner: it reaches the budget, keeps the constraints, spends where removal is cheap,
and refuses bad input before any scoring work."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch

from course_lib import budget
from course_lib.budget import plan_for_budget, sensitivity
from course_lib.surgery import parameters_removed

from tiny import calib, tiny_bert, tiny_llama, wide_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def block_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


@pytest.fixture(scope="module")
def measured():
    model = wide_llama()
    return model, sensitivity(model, calib(n=8), progress=False)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_budget_is_reached_with_aligned_widths_and_protected_ends(measured, fraction):
    model, sens = measured
    plan = plan_for_budget(model, fraction=fraction, sens=sens, multiple=8, min_neurons=8)
    total = block_params(model)
    removed = parameters_removed(model, plan)
    assert removed >= fraction * total
    info = plan.selection_info[0]
    assert info["achieved"] == removed and info["requested"] == math.ceil(fraction * total)
    assert 0 not in plan.neurons and 3 not in plan.neurons and 0 not in plan.heads and 3 not in plan.layers
    for layer, neurons in plan.neurons.items():
        assert (32 - len(neurons)) % 8 == 0


@pytest.mark.parametrize("seed", range(5))
def test_cover_is_the_least_error_choice_reaching_the_target(seed):
    rng = random.Random(seed)
    options = [[{"params": 0, "error": 0.0}] + [{"params": 6 * rng.randint(1, 8), "error": rng.random()}
                                                for _ in range(3)] for _ in range(4)]
    target = 6 * rng.randint(4, 16)
    best = min((sum(o[j]["error"] for o, j in zip(options, c)), c)
               for c in itertools.product(range(4), repeat=4)
               if sum(o[j]["params"] for o, j in zip(options, c)) >= target)
    choice = budget._cover(options, target)
    assert sum(o[j]["error"] for o, j in zip(options, choice)) == pytest.approx(best[0])
    assert sum(o[j]["params"] for o, j in zip(options, choice)) >= target
    assert budget._cover(options, 10**6) is None


def test_planner_spends_where_removal_costs_nothing():
    model = wide_llama(seed=1)
    with torch.no_grad():  # neurons 0-15 of layer 2 write nothing: removing them is free
        model.model.layers[2].mlp.down_proj.weight[:, :16] = 0
    sens = sensitivity(model, calib(n=8), progress=False)
    per_neuron = sens.layers[2].neuron_params
    plan = plan_for_budget(model, fraction=16 * per_neuron / block_params(model), sens=sens, multiple=8,
                           allow=("neurons",))
    assert plan.neurons == {2: list(range(16))}
    assert sens.layers[2].neuron_errors[16] < 1e-6 < sens.layers[1].neuron_errors[8]


def test_layers_only_when_cheapest():
    model = wide_llama(seed=2)
    with torch.no_grad():  # block 1 does nothing: its outputs are zeroed
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    sens = sensitivity(model, calib(n=8), progress=False)
    assert sens.layers[1].block_error < 1e-9
    plan = plan_for_budget(model, fraction=0.25, sens=sens, multiple=8)
    assert plan.layers == [1]


def test_encoder_plan_keeps_even_head_counts_when_aligned():
    model = tiny_bert()
    sens = sensitivity(model, [{"input_ids": calib(n=8)}], progress=False)
    plan = plan_for_budget(model, fraction=0.3, sens=sens, multiple=16, min_neurons=8, protect_first=0,
                           protect_last=0, allow=("heads", "neurons"))
    for layer, heads in plan.heads.items():
        assert ((4 - len(heads)) * 8) % 16 == 0
    assert parameters_removed(model, plan) >= 0.3 * sum(p.numel() for layer in model.encoder.layer
                                                        for p in layer.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 0.0}, r"fraction must be a number in \(0, 1\)"),
    ({"fraction": 1.0}, r"fraction must be a number in \(0, 1\)"),
    ({"fraction": "0.2"}, r"fraction must be a number in \(0, 1\)"),
    ({"fraction": 0.2, "allow": ("rows",)}, r"allow=\('rows',\): give one or more of"),
    ({"fraction": 0.2, "protect_first": 2, "protect_last": 2}, "leaves none of the 4 layers"),
    ({"fraction": 0.45, "allow": ("neurons",)}, r"constraints allow at most .* allow=\['neurons'\]"),
    ({"fraction": 0.2, "multiple": 0}, "multiple must be an integer >= 1"),
])
def test_bad_budgets_are_refused_before_scoring(monkeypatch, kwargs, message):
    model = wide_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(budget, "sensitivity", lambda *a, **k: pytest.fail("scoring ran before the check"))
    with pytest.raises(ValueError, match=message):
        plan_for_budget(model, calib(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_calibration_is_named():
    with pytest.raises(ValueError, match="calib is empty"):
        plan_for_budget(wide_llama(), torch.zeros(0, 8, dtype=torch.long), fraction=0.2, progress=False)
    with pytest.raises(ValueError, match="calib is required"):
        plan_for_budget(wide_llama(), None, fraction=0.2, progress=False)


def test_sensitivity_does_not_change_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sensitivity(model, calib(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_plan_summary_says_per_layer_what_and_why(measured):
    from course_lib.selection import format_summary, plan_summary

    model, sens = measured
    plan = plan_for_budget(model, fraction=0.25, sens=sens, multiple=8)
    text = format_summary(plan_summary(model, plan), plan)
    pruned = [i for i in range(4) if i in plan.layers or i in plan.neurons or i in plan.heads or i in plan.kv_groups]
    for i in pruned:
        assert re.search(rf"layer +{i}: +[\d,]+ parameters, predicted error [\d.e+-]+ \(", text), text
    assert "plan_for_budget: requested" in text
