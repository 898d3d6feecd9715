"""Reconstruction: the least-squares algebra, exact refits where one must exist, and save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from tiny import calib, tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

from course_lib.plan import PruningPlan
from course_lib.reconstruction import (
    Gram,
    augmented_weight,
    change_error,
    prune_and_reconstruct,
    reconstruct,
    refit,
    removal_error,
    removal_path,
)
from course_lib.surgery import apply_plan, parameters_removed

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- algebra -------------------------------------------------------------------------------------
def test_gram_is_the_weighted_second_moment_with_a_constant_column():
    x, w = torch.randn(2, 5, 3), torch.rand(2, 5)
    w[1, 4] = 0  # a padding token
    gram = Gram(3)
    gram.add(x, w)
    xa = torch.cat([x.reshape(-1, 3), torch.ones(10, 1)], 1).double()
    expected = (xa * w.reshape(-1, 1).double()).T @ xa
    assert torch.allclose(gram.matrix, expected)
    assert gram.tokens == 9


def test_refit_is_exact_when_removed_inputs_are_affine_in_kept_ones():
    torch.manual_seed(0)
    kept = torch.randn(400, 5, dtype=torch.float64)
    removed = kept @ torch.randn(5, 2, dtype=torch.float64) + torch.tensor([0.5, -1.0], dtype=torch.float64)  # affine: the bias must absorb the constant
    x = torch.cat([kept, removed], 1)
    linear = nn.Linear(7, 4, bias=False)
    gram = Gram(7)
    gram.add(x, torch.ones(400))
    weight, bias = refit(linear, gram, torch.arange(5), ridge=0.0)
    target = x @ linear.weight.detach().double().T
    assert torch.allclose(kept @ weight.T + bias, target, atol=1e-8)
    # without an intercept the constant cannot be matched
    weight0, bias0 = refit(linear, gram, torch.arange(5), ridge=0.0, intercept=False)
    assert bias0 is None
    assert not torch.allclose(kept @ weight0.T, target, atol=1e-3)


def test_removal_error_matches_the_error_of_the_refit():
    torch.manual_seed(1)
    x = torch.randn(300, 6)
    linear = nn.Linear(6, 3)
    gram = Gram(6)
    gram.add(x, torch.rand(300))
    keep, gone = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 4])
    weight, bias = refit(linear, gram, keep, ridge=0.0)
    new = torch.zeros(3, 7, dtype=torch.float64)
    new[:, keep], new[:, -1] = weight, bias
    assert change_error(augmented_weight(linear), new, gram) == pytest.approx(
        removal_error(linear, gram, gone, ridge=0.0), rel=1e-6)


@pytest.mark.parametrize("step", [1, 3])
def test_removal_path_errors_are_exact_for_its_prefixes(step):
    torch.manual_seed(2)
    x = torch.randn(500, 12) @ torch.randn(12, 12)
    linear = nn.Linear(12, 5)
    gram = Gram(12)
    gram.add(x, torch.ones(500))
    order, errors = removal_path(linear, gram, 1, 9, step=step, ridge=1e-3)
    assert sorted(order) == sorted(set(order)) and len(order) == 9
    for k in range(step, 10, step):
        assert errors[k] == pytest.approx(removal_error(linear, gram, torch.tensor(order[:k]), ridge=1e-3), rel=1e-6)
    if step == 1:  # the first unit taken is the cheapest one on its own
        singles = [removal_error(linear, gram, torch.tensor([j]), ridge=1e-3) for j in range(12)]
        assert order[0] == min(range(12), key=singles.__getitem__)


# ---- whole models --------------------------------------------------------------------------------
def duplicate_units(model: LlamaForCausalLM) -> PruningPlan:
    """Make neuron 5 a copy of neuron 2 and query head 1 a copy of head 0 (same KV group) in every
    layer; the plan removes the copies, so a refit exists that loses nothing."""
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[5] = lin.weight[2]
            q = layer.self_attn.q_proj.weight
            q[d:2 * d] = q[:d]
    n = len(model.model.layers)
    return PruningPlan(heads={i: [1] for i in range(n)}, neurons={i: [5] for i in range(n)})


def test_reconstruction_is_exact_when_removed_units_are_copies():
    model = tiny_llama()
    plan = duplicate_units(model)
    # a GQA layer keeps equal groups: remove one query head from each group (heads 1 and 3; 3 = copy of 2)
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight
            q[3 * d:4 * d] = q[2 * d:3 * d]
    plan = PruningPlan(heads={i: [1, 3] for i in plan.heads}, neurons=plan.neurons)
    ids = calib(3, 2, 12)
    with torch.no_grad():
        expected = model(ids).logits
    plain = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert (plain(ids).logits - expected).abs().max() > 1e-2  # removing without refit changes outputs
    report = prune_and_reconstruct(model, plan, calib(), ridge=0.0, progress=False)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert all(r["refitted"] < 1e-8 < r["zeroed"] for r in report.rows)
    assert {(r["layer"], r["projection"]) for r in report.rows} == {(i, p) for i in range(3)
                                                                     for p in ("attention", "mlp")}


def test_reconstruction_on_bert_keeps_duplicate_neurons_exact():
    model = tiny_bert()
    with torch.no_grad():
        for layer in model.encoder.layer:
            lin = layer.intermediate.dense
            lin.weight[7], lin.bias[7] = lin.weight[3], lin.bias[3]
    plan = PruningPlan(neurons={0: [7], 1: [7]})
    ids = calib(4, 2, 10)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    prune_and_reconstruct(model, plan, [{"input_ids": calib(5, 4, 10)}], ridge=0.0, progress=False)
    with torch.no_grad():
        assert (model(ids).last_hidden_state - expected).abs().max() < 1e-4


def test_reconstruction_beats_plain_removal_on_held_out_tokens():
    model = tiny_llama(seed=3)
    plan = PruningPlan(heads={0: [0, 2], 1: [1, 3]}, neurons={0: list(range(8)), 2: list(range(0, 24, 2))})
    ids = calib(9, 4, 16)
    with torch.no_grad():
        expected = model(ids).logits
    plain = apply_plan(copy.deepcopy(model), plan)
    refitted = copy.deepcopy(model)
    prune_and_reconstruct(refitted, plan, calib(10, 24, 16), progress=False)
    with torch.no_grad():
        err_plain = (plain(ids).logits - expected).pow(2).mean()
        err_refit = (refitted(ids).logits - expected).pow(2).mean()
    assert err_refit < 0.7 * err_plain


def test_reconstruction_adds_biases_and_counts_them():
    model = tiny_llama()
    plan = PruningPlan(heads={0: [0, 2]}, neurons={1: [0, 1, 2]}, layers=[2])
    dense = sum(p.numel() for p in model.parameters())
    removed = parameters_removed(model, plan)
    prune_and_reconstruct(model, plan, calib(), progress=False)
    hidden = model.config.hidden_size
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    assert model.model.layers[1].mlp.down_proj.bias is not None
    assert model.model.layers[0].mlp.down_proj.bias is None  # nothing removed there: nothing refitted
    assert sum(p.numel() for p in model.parameters()) == dense - removed + 2 * hidden
    shapes = model.config.layer_shapes
    assert [s["o_bias"] for s in shapes] == [True, False] and [s["mlp_out_bias"] for s in shapes] == [False, True]


def test_bias_false_refits_weights_only():
    model = tiny_llama()
    plan = PruningPlan(neurons={0: [0, 1, 2]})
    prune_and_reconstruct(model, plan, calib(), bias=False, progress=False)
    assert model.model.layers[0].mlp.down_proj.bias is None


def test_bad_arguments_leave_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="ridge"):
        reconstruct(model, PruningPlan(neurons={0: [1]}), calib(), ridge=-1.0, progress=False)
    with pytest.raises(ValueError, match="calib is empty"):
        reconstruct(model, PruningPlan(neurons={0: [1]}), torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="neurons: layer 0"):
        reconstruct(model, PruningPlan(neurons={0: [99]}), calib(), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
