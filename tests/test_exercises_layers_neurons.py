"""Notebooks 04 and 05: exercise checks, helpers and widgets, on tiny random models (headless)."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from course_lib import importance
from course_lib.evaluate import count_parameters
from course_lib.exercises import CheckFailed
from course_lib.exercises.layers import (block_io, cache_indices, check_block_influence_hooks, check_token_distance, flattened_block_influence,
                                         layer_removal_explorer, layer_removal_sweep, naive_remove_layers,
                                         padded_batch, reference_token_distance)
from course_lib.exercises.neurons import (bottom_overlap, check_down_refit, check_gated_neuron_parameters,
                                          check_wanda_scores, compare_latency, dead_neuron_explorer, dead_shares,
                                          layer_normalised, mlp_inputs, mlp_widths, uniform_plan)
from course_lib.plan import PruningPlan
from course_lib.selection import select_layers
from course_lib.surgery import apply_plan, parameters_removed


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(1)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(2))


# ----------------------------------------------------------------------------- 04: the exercise


def right(x_in, x_out, mask):
    return (1 - F.cosine_similarity(x_in, x_out, dim=-1))[mask].mean()


WRONG = {
    "flattened": (lambda a, b, m: (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean(), "flattened"),
    "no mask": (lambda a, b, m: (1 - F.cosine_similarity(a, b, dim=-1)).mean(), "padding included"),
    "per sequence": (lambda a, b, m: torch.stack([(1 - F.cosine_similarity(a[i], b[i], dim=-1))[m[i]].mean()
                                                   for i in range(a.shape[0])]).mean(), "each sequence first"),
    "cosine": (lambda a, b, m: F.cosine_similarity(a, b, dim=-1)[m].mean(), "1 - cos"),
    "angular": (lambda a, b, m: (torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi)[m].mean(),
                "angular"),
    "sequence axis": (lambda a, b, m: 1 - F.cosine_similarity(a, b, dim=1), "SEQUENCE axis"),
    "per token": (lambda a, b, m: 1 - F.cosine_similarity(a, b, dim=-1), "one value per token"),
    "sum": (lambda a, b, m: (1 - F.cosine_similarity(a, b, dim=-1))[m].sum(), "summed"),
}


def test_token_distance_check_accepts_the_right_answer(llama, ids):
    out = check_token_distance(right, llama, ids, layers=(0, 3, 5), lengths=(16, 9, 4))
    reference = importance.block_influence(llama, padded_batch(ids, (16, 9, 4)), batch_size=3, progress=False)
    for layer, value in out.items():
        assert value == pytest.approx(float(reference[layer]), rel=1e-4)


@pytest.mark.parametrize("name", sorted(WRONG))
def test_token_distance_check_names_the_mistake(name):
    fn, fragment = WRONG[name]
    with pytest.raises(CheckFailed, match=fragment):
        check_token_distance(fn)


def test_reference_distance_matches_the_library_token_distance():
    from course_lib.importance.layers import token_distance

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert reference_token_distance(a, b, mask) == pytest.approx(float(token_distance(a, b, "bi")[mask].mean()))


def hooked(distance=lambda cos: torch.arccos(cos) / math.pi, *, flatten=False, mask=True, mean="tokens",
           remove=True):
    """A learner's forward-hook block influence, with switches for the usual mistakes."""

    def fn(model, batches):
        blocks = model.model.layers
        sums, tokens, per_unit, current = torch.zeros(len(blocks), dtype=torch.float64), 0, [], {}

        def make_hook(layer):
            def hook(module, args, kwargs, output):
                x, y = args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output
                if flatten:
                    x, y = x.flatten(1), y.flatten(1)
                d = distance(F.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1, 1))
                keep = current["mask"] if mask and not flatten else torch.ones_like(d, dtype=torch.bool)
                sums[layer] += d[keep].sum()
                current["units"][layer] = d[keep].mean()
            return hook

        handles = [b.register_forward_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        with torch.no_grad():
            for batch in batches:
                current["mask"], current["units"] = batch["attention_mask"].bool(), torch.zeros(len(blocks))
                counted = current["mask"] if mask else torch.ones_like(current["mask"])
                tokens += batch["input_ids"].shape[0] if flatten else int(counted.sum())
                model(**batch)
                per_unit.append(current["units"])
        if remove:
            for h in handles:
                h.remove()
        return torch.stack(per_unit).mean(0) if mean == "batches" else sums / tokens

    return fn


HOOKS_WRONG = {
    "1 - cos": (hooked(lambda cos: 1 - cos), "1 - cos"),
    "flattened": (hooked(flatten=True), "flattened"),
    "flattened 1 - cos": (hooked(lambda cos: 1 - cos, flatten=True), "lesson's score exactly"),
    "no mask": (hooked(mask=False), "padding included"),
    "per batch": (hooked(mean="batches"), "each batch"),
    "hooks left": (hooked(remove=False), "still registered"),
}


def test_hooks_check_accepts_the_right_answer(llama, ids):
    got = check_block_influence_hooks(hooked(), llama, ids, lengths=(16, 9, 4))
    reference = importance.block_influence(llama, padded_batch(ids, (16, 9, 4)), metric="angular", batch_size=2,
                                           progress=False)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(HOOKS_WRONG))
def test_hooks_check_names_the_mistake_and_leaves_no_hook(llama, ids, name):
    fn, fragment = HOOKS_WRONG[name]
    with pytest.raises(CheckFailed, match=fragment):
        check_block_influence_hooks(fn, llama, ids, lengths=(16, 9, 4))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())


# ----------------------------------------------------------------------------- 04: helpers


def test_flattened_score_is_one_cosine_per_sequence(llama, ids):
    flat = flattened_block_influence(llama, ids, batch_size=3)
    states, mask = block_io(llama, ids)
    assert mask.all() and flat.shape == (6,)
    for layer, (a, b) in states.items():
        expected = (1 - F.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1)).mean()
        assert float(flat[layer]) == pytest.approx(float(expected), rel=1e-5)


def test_block_io_per_token_matches_block_influence(llama, ids):
    batch = padded_batch(ids, (16, 7))
    states, mask = block_io(llama, batch, layers=[2])
    assert mask.sum(1).tolist() == [16, 7]
    bi = importance.block_influence(llama, batch, batch_size=2, progress=False)
    assert reference_token_distance(*states[2], mask) == pytest.approx(float(bi[2]), rel=1e-5)


def test_naive_removal_keeps_stale_indices_and_apply_plan_reindexes(llama):
    naive = naive_remove_layers(llama, [1, 2])
    assert cache_indices(naive) == [0, 3, 4, 5]
    assert cache_indices(llama) == list(range(6)), "the original model is untouched"
    assert all(p is q for p, q in zip(naive.model.layers[1].parameters(), llama.model.layers[3].parameters()))
    pruned = apply_plan(copy.deepcopy(llama), PruningPlan(layers=[1, 2]))
    assert cache_indices(pruned) == [0, 1, 2, 3]
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    with pytest.raises(IndexError), torch.no_grad():
        naive.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)


def test_layer_removal_sweep(llama, ids):
    scores = torch.tensor([0.9, 0.1, 0.3, 0.2, 0.5, 0.8])
    stream = ids.reshape(-1)
    rows, kept = layer_removal_sweep(llama, scores, [0, 2], stream, context=16, stride=16, keep=(2,))
    assert [r.k for r in rows] == [0, 2] and rows[0].layers == [] and rows[1].layers == [1, 3]
    assert rows[0].params == count_parameters(llama)
    assert rows[0].params - rows[1].params == parameters_removed(llama, PruningPlan(layers=[1, 3]))
    assert set(kept) == {2} and len(kept[2].model.layers) == 4
    assert len(llama.model.layers) == 6


def test_layer_removal_explorer_headless(llama):
    scores = {"a": torch.tensor([0.9, 0.1, 0.3, 0.2, 0.5, 0.8]), "b": torch.arange(6.0).flip(0)}
    widget, explorer = layer_removal_explorer(llama, scores, measured={("a", 2): 12.5}, max_k=4, draw=False)
    assert explorer.current.k == 0 and explorer.current.layers == []
    explorer.slider.value = 2
    assert explorer.current.layers == [1, 3] and explorer.current.measured == 12.5
    plan = select_layers(llama, scores["a"], count=2)
    assert explorer.current.params_removed == parameters_removed(llama, plan)
    assert "12.50" in explorer.label.value
    explorer.dropdown.value = "b"
    assert explorer.current.layers == [4, 5] and explorer.current.measured is None
    with pytest.raises(CheckFailed, match="layers"):
        layer_removal_explorer(llama, {"bad": torch.ones(3)}, draw=False)


def test_layer_removal_explorer_draws(llama):
    _, explorer = layer_removal_explorer(llama, {"a": torch.arange(6.0)}, draw=True)
    explorer.slider.value = 1
    assert explorer.figure is not None


# ----------------------------------------------------------------------------- 05: the exercises


def wanda_right(w, x):
    return w.abs().sum(0) * x.norm(dim=0)


WANDA_WRONG = {
    "squared": (lambda w, x: w.abs().sum(0) * (x ** 2).sum(0), "sum of squares"),
    "mean": (lambda w, x: w.abs().sum(0) * x.abs().mean(0), "mean"),
    "rms": (lambda w, x: w.abs().sum(0) * x.norm(dim=0) / math.sqrt(x.shape[0]), "root-mean-square"),
    "l2 column": (lambda w, x: w.norm(dim=0) * x.norm(dim=0), "L2 norm of the weight column"),
    "no abs": (lambda w, x: w.sum(0) * x.norm(dim=0), "absolute values"),
    "rows": (lambda w, x: w.abs().sum(1), "wrong axis"),
    "per weight": (lambda w, x: w.abs() * x.norm(dim=0), "sum the per-weight"),
    "weights only": (lambda w, x: w.abs().sum(0), "activation norm"),
}


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_wanda_check_accepts_the_right_answer(model_name, request, ids):
    model = request.getfixturevalue(model_name)
    out = check_wanda_scores(wanda_right, model, ids)
    reference = importance.neuron_scores(model, ids, "wanda", progress=False)
    for layer, scores in out.items():
        torch.testing.assert_close(scores, reference[layer], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(WANDA_WRONG))
def test_wanda_check_names_the_mistake(name, llama, ids):
    fn, fragment = WANDA_WRONG[name]
    with pytest.raises(CheckFailed, match=fragment):
        check_wanda_scores(fn, llama, ids)


def test_gated_parameter_check(llama):
    plan = PruningPlan(neurons={0: [1, 2, 3], 4: list(range(10))})
    pruned = apply_plan(copy.deepcopy(llama), plan)
    assert check_gated_neuron_parameters(lambda p, d: 13 * 3 * d, llama, plan, pruned=pruned) == 13 * 3 * 32
    for wrong, fragment in ((13 * 2 * 32, "gate"), (13 * 32, "3 \\* hidden_size"), (13 * 3 * 32 + 13, "no biases"),
                            (13, "neurons, not parameters")):
        with pytest.raises(CheckFailed, match=fragment):
            check_gated_neuron_parameters(lambda p, d, w=wrong: w, llama, plan)


def test_gated_parameter_check_rejects_other_plans_and_models(llama, bert):
    with pytest.raises(CheckFailed, match="neurons-only"):
        check_gated_neuron_parameters(lambda p, d: 0, llama, PruningPlan(layers=[1]))
    with pytest.raises(CheckFailed, match="gated"):
        check_gated_neuron_parameters(lambda p, d: 0, bert, PruningPlan(neurons={0: [1]}))


# ----------------------------------------------------------------------------- 05: helpers


def test_mlp_inputs_keep_only_real_tokens(llama, ids):
    batch = padded_batch(ids, (16, 5))
    x = mlp_inputs(llama, batch, [1])[1]
    assert x.shape == (21, 48)
    block = llama.model.layers[1]
    captured = []
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        llama.model(ids[:1])
    handle.remove()
    torch.testing.assert_close(x[:16], captured[0][0])


def test_layer_normalised_bottom_overlap_and_dead_shares():
    a = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])]
    normed = layer_normalised(a)
    assert [float(s.median()) for s in normed] == [1.0, 1.0]
    assert torch.equal(torch.argsort(normed[1]), torch.argsort(a[1]))
    b = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])]
    assert bottom_overlap(a, b, 0.5).tolist() == [0.0, 1.0]
    assert dead_shares([torch.tensor([0.0, 0.5, 1.0, 0.05])], 0.1).tolist() == [0.5]
    with pytest.raises(CheckFailed, match="median"):
        layer_normalised([torch.zeros(3)])


def test_uniform_plan_and_widths(llama):
    scores = [torch.arange(48.0)] * 6
    plan = uniform_plan(llama, scores, keep=32)
    assert all(plan.neurons[i] == list(range(16)) for i in range(6))
    pruned = apply_plan(copy.deepcopy(llama), plan)
    assert mlp_widths(pruned) == [32] * 6 and mlp_widths(llama) == [48] * 6
    assert uniform_plan(llama, scores, keep=48).neurons == {}


def test_compare_latency_reports_ratios_from_medians(llama):
    result = compare_latency({"a": llama, "b": llama}, rounds=2, batch=1, seq=4, repeats=1, warmup=0)
    assert set(result) == {"a", "b"} and result["a"]["speedup"] == 1.0
    assert len(result["b"]["rounds_ms"]) == 2 and result["b"]["median_ms"] > 0


def test_dead_neuron_explorer_headless():
    freqs = {"m1": {1e-3: [torch.tensor([0.0, 0.2, 1.0]), torch.tensor([0.5, 0.5, 0.005])],
                    1e-2: [torch.tensor([0.0, 0.0, 0.9]), torch.tensor([0.5, 0.5, 0.5])]},
             "m2": {0.1: [torch.tensor([0.05, 1.0])]}}
    widget, explorer = dead_neuron_explorer(freqs, draw=False)
    assert explorer.current.model == "m1" and explorer.current.eps == 1e-3 and explorer.current.threshold == 0.01
    assert explorer.current.per_layer.tolist() == pytest.approx([1 / 3, 1 / 3]) and explorer.current.count == 2
    explorer.eps_box.value = 1e-2
    assert explorer.current.count == 2 and explorer.current.per_layer.tolist() == pytest.approx([2 / 3, 0.0])
    explorer.threshold.value = 0.5
    assert explorer.current.count == 2
    explorer.threshold.value = 0.1
    explorer.model_box.value = "m2"
    assert explorer.current.eps == 0.1 and explorer.current.count == 1 and explorer.current.total == 0.5
    assert "50.00%" in explorer.label.value


def test_dead_neuron_explorer_draws():
    _, explorer = dead_neuron_explorer({"m": {0.01: [torch.tensor([0.0, 1.0])]}}, draw=True)
    explorer.threshold.value = 0.5
    assert explorer.figure is not None


def refit_right(w, x, keep, lam, *, toward_sliced=True):
    x, w = x.double(), w.double()
    x_kept = x[:, keep]
    gram = x_kept.T @ x_kept + lam * torch.eye(len(keep), dtype=x.dtype)
    rhs = x_kept.T @ (x @ w.T) + (lam * w[:, keep].T if toward_sliced else 0)
    return torch.linalg.solve(gram, rhs).T


REFIT_WRONG = {
    "no ridge": (lambda w, x, keep, lam: refit_right(w, x, keep, 0.0), "plain least-squares"),
    "toward zero": (lambda w, x, keep, lam: refit_right(w, x, keep, lam, toward_sliced=False), "toward zero"),
    "pruned target": (lambda w, x, keep, lam: refit_right(w[:, keep], x[:, keep], torch.arange(len(keep)), lam,
                                                          toward_sliced=False), "dense layer's output"),
    "sliced": (lambda w, x, keep, lam: w[:, keep], "pruned weight unchanged"),
    "transpose": (lambda w, x, keep, lam: refit_right(w, x, keep, lam).T, "transpose"),
    "target product": (lambda w, x, keep, lam: x @ w, "matrix product failed"),
    "ridge scaled": (lambda w, x, keep, lam: refit_right(w, x, keep, 10 * lam), "away from the solution"),
}


def test_down_refit_check_accepts_the_right_answer_in_float32_too(llama, ids):
    out = check_down_refit(refit_right, llama, ids, layer=2)
    assert (out["layer"], out["kept"], out["neurons"]) == (2, 36, 48)
    assert out["fit_tokens"] == 48 and out["test_tokens"] == 16 and out["lam"] > 0
    assert out["heldout_error"]["refit"] < out["heldout_error"]["sliced"]
    check_down_refit(lambda w, x, keep, lam: refit_right(w, x, keep, lam).float(), llama, ids, layer=2)


@pytest.mark.parametrize("name", sorted(REFIT_WRONG))
def test_down_refit_check_names_the_mistake(name, llama, ids):
    fn, fragment = REFIT_WRONG[name]
    with pytest.raises(CheckFailed, match=fragment):
        check_down_refit(fn, llama, ids, layer=2)


def test_down_refit_check_names_a_singular_system(llama, ids):
    def singular_solve(w, x, keep, lam):
        x_kept = x.double()[:, keep]
        return torch.linalg.solve(torch.zeros(len(keep), len(keep), dtype=torch.float64), x_kept.T @ x_kept).T

    with pytest.raises(CheckFailed, match="lam \\* I"):
        check_down_refit(singular_solve, llama, ids, layer=2)
    with pytest.raises(CheckFailed, match="fit_windows=4"):
        check_down_refit(refit_right, llama, ids, fit_windows=4)
