"""Selection turns scores into valid plans: exact (or documented, rounded-down) counts, global
lowest-first ranking, protections, per-layer minimums, GQA-feasible head sets, aligned widths,
parameter budgets that are never exceeded, deterministic results, clear errors, and summaries that
match the model after surgery.

Models are tiny random Llamas (MHA, GQA, MQA) and BERTs built from configs; scores are random
(often with many ties).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from course_lib.plan import PruningPlan
from course_lib.pruned_modeling import adapter_for
from course_lib.selection import (
    format_summary,
    merge_plans,
    plan_summary,
    select_heads,
    select_layers,
    select_neurons,
    select_span,
    selection_info,
)
from course_lib.surgery import apply_plan, parameters_removed

pytestmark = pytest.mark.usefixtures("one_thread")
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- tiny models (built once; every test that prunes works on a deep copy) -----------------------
def _llama(n_heads, n_kv, layers=4, head_dim=8, inter=48):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=n_heads * head_dim, num_hidden_layers=layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                         intermediate_size=inter, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _bert(n_heads=4, head_dim=16, layers=4, inter=64):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=n_heads * head_dim, num_hidden_layers=layers,
                        num_attention_heads=n_heads, intermediate_size=inter, max_position_embeddings=32)
    return BertModel(config).eval()


MODELS = {
    "mha": _llama(6, 6),
    "gqa": _llama(12, 4),
    "gqa2": _llama(8, 2, layers=3),
    "mqa": _llama(4, 1),
    "bert": _bert(),
}


def shapes(model):
    a = adapter_for(model)
    blocks = a.blocks(model)
    return [a.num_heads(b) for b in blocks], [a.num_kv_heads(b) for b in blocks], [a.intermediate_size(b) for b in blocks]


def rand_scores(data, n_layers, width, ties):
    """Random scores; with ``ties`` they come from a handful of values (many exact ties)."""
    values = st.integers(0, 3).map(float) if ties else st.floats(-5, 5, allow_nan=False, width=32)
    flat = data.draw(st.lists(values, min_size=n_layers * width, max_size=n_layers * width))
    return torch.tensor(flat, dtype=torch.float64).reshape(n_layers, width)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def n_removed(table):
    return sum(len(v) for v in table.values())


def feasible_kept(n_q, n_kv, head_dim, align, min_heads, protected):
    """Independent restatement of the feasible kept head counts of one layer."""
    size = n_q // n_kv
    kept = {n_q}
    if not protected:
        kept |= {g * k for g in range(1, n_kv + 1) for k in range(1, size + 1)
                 if g * k >= min_heads and (g * k * head_dim) % align == 0}
    return kept


def best_achievable(per_layer_removals, requested):
    sums = {0}
    for options in per_layer_removals:
        sums = {s + r for s in sums for r in options}
    return max(s for s in sums if s <= requested)


def check_applied(model, plan):
    """Apply the plan on a copy; the summary rows must match the pruned shapes and parameters."""
    rows = plan_summary(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    a = adapter_for(pruned)
    kept_rows = [r for r in rows if not r["removed"]]
    assert len(kept_rows) == len(a.blocks(pruned))
    for row, block in zip(kept_rows, a.blocks(pruned)):
        assert row["heads_after"] == a.num_heads(block)
        assert row["kv_after"] == a.num_kv_heads(block)
        assert row["neurons_after"] == a.intermediate_size(block)
        assert row["params_after"] == sum(p.numel() for p in block.parameters())
    assert sum(r["params_before"] - r["params_after"] for r in rows) == parameters_removed(model, plan)
    return pruned


# ---- heads -------------------------------------------------------------------------------------
@PROPERTY
@given(data=st.data(), name=st.sampled_from(["mha", "bert"]), ties=st.booleans())
def test_unconstrained_heads_are_the_lowest_by_score_layer_index(data, name, ties):
    model = MODELS[name]
    n_q, _, _ = shapes(model)
    scores = rand_scores(data, len(n_q), max(n_q), ties)
    count = data.draw(st.integers(0, sum(n_q) // 2))
    ranking = sorted((scores[l, h].item(), l, h) for l in range(len(n_q)) for h in range(n_q[l]))
    # the first `count` of the global ranking are feasible unless one layer would be emptied
    expected = ranking[:count]
    per_layer = {l: sum(1 for _, ll, _ in expected if ll == l) for l in range(len(n_q))}
    assume(all(per_layer[l] < n_q[l] for l in per_layer))
    plan = select_heads(model, scores, count=count, multiple=1)
    assert n_removed(plan.heads) == count
    assert sorted((l, h) for l, hs in plan.heads.items() for h in hs) == sorted((l, h) for _, l, h in expected)
    assert selection_info(plan)[0]["achieved"] == count


def test_all_ties_remove_lowest_layer_and_index_first():
    model = MODELS["mha"]
    plan = select_heads(model, torch.zeros(4, 6), count=8, multiple=1)
    assert plan.heads == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2]}


@PROPERTY
@given(
    data=st.data(),
    name=st.sampled_from(["mha", "gqa", "gqa2", "mqa", "bert"]),
    multiple=st.sampled_from([1, 16, 32]),
    min_heads=st.integers(1, 4),
    ties=st.booleans(),
)
def test_head_selection_invariants(data, name, multiple, min_heads, ties):
    model = MODELS[name]
    n_q, n_kv, _ = shapes(model)
    n_layers, head_dim = len(n_q), adapter_for(model).head_dim(model)
    pf = data.draw(st.integers(0, 1))
    pl = data.draw(st.integers(0, n_layers - 1 - pf))
    scores = rand_scores(data, n_layers, max(n_q), ties)
    kept_options = [feasible_kept(n_q[l], n_kv[l], head_dim, multiple, min_heads,
                                  l < pf or l >= n_layers - pl) for l in range(n_layers)]
    removals = [{n_q[l] - k for k in kept_options[l]} for l in range(n_layers)]
    capacity = sum(max(r) for r in removals)
    count = data.draw(st.integers(0, capacity))
    plan = quiet(select_heads, model, scores, count=count, multiple=multiple, min_heads=min_heads,
                 protect_first=pf, protect_last=pl)
    # exact with respect to what alignment and GQA allow: the largest achievable count <= request
    assert n_removed(plan.heads) == best_achievable(removals, count) == selection_info(plan)[0]["achieved"]
    if multiple == 1 and all(n_kv[l] in (1, n_q[l]) for l in range(n_layers)) and min_heads == 1:
        assert n_removed(plan.heads) == count  # MHA / MQA unaligned: every count is exact
    for l, heads in plan.heads.items():
        assert not (l < pf or l >= n_layers - pl), "protected layer touched"
        kept = n_q[l] - len(heads)
        assert kept >= min_heads
        assert (kept * head_dim) % multiple == 0
        size = n_q[l] // n_kv[l]
        per_group = {g: size - sum(1 for h in heads if h // size == g) for g in range(n_kv[l])}
        assert len({v for v in per_group.values() if v > 0}) == 1, per_group
    # the plan is valid and surgery agrees (kept groups equal, shapes consistent)
    check_applied(model, plan)
    # deterministic
    assert quiet(select_heads, model, scores, count=count, multiple=multiple, min_heads=min_heads,
                 protect_first=pf, protect_last=pl) == plan


def _removed_score(scores, plan):
    return sum(scores[l, h].item() for l, hs in plan.heads.items() for h in hs)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_gqa_choice_is_optimal_by_brute_force(data):
    """2 layers x 6 heads in 3 groups: no feasible set of the same size removes less score."""
    model = _GQA_SMALL
    scores = rand_scores(data, 2, 6, ties=False)
    feasible = []
    for r in range(6):
        for removed in itertools.combinations(range(6), r):
            sizes = {2 - sum(1 for h in removed if h // 2 == g) for g in range(3)} - {0}
            if len(sizes) == 1:
                feasible.append(removed)
    count = data.draw(st.integers(0, 10))
    best = min((sum(scores[0, h].item() for h in a) + sum(scores[1, h].item() for h in b)
                for a in feasible for b in feasible if len(a) + len(b) == count), default=None)
    assume(best is not None)
    plan = quiet(select_heads, model, scores, count=count, multiple=1)
    assert n_removed(plan.heads) == count
    assert _removed_score(scores, plan) == pytest.approx(best, abs=1e-9)


_GQA_SMALL = _llama(6, 3, layers=2)


def test_minilm_like_alignment_moves_in_steps_of_two_heads():
    model = _bert(n_heads=12, head_dim=32, layers=2, inter=64)
    scores = torch.arange(24, dtype=torch.float64).reshape(2, 12)
    plan = select_heads(model, scores, count=4)  # multiple=64 by default
    assert plan.heads == {0: [0, 1, 2, 3]}
    with pytest.warns(UserWarning, match="5 query heads requested but only 4 are achievable"):
        plan = select_heads(model, scores, count=5)
    assert n_removed(plan.heads) == 4 and selection_info(plan)[0]["requested"] == 5
    assert all((12 - len(h)) * 32 % 64 == 0 for h in plan.heads.values())
    with pytest.raises(ValueError, match="5 query heads requested but only 4"):
        select_heads(model, scores, count=5, strict=True)
    # quant groups of 128 -> widths multiple of 128 -> steps of 4 heads
    plan = quiet(select_heads, model, scores, count=7, quant_group_size=128)
    assert n_removed(plan.heads) == 4 and all((12 - len(h)) * 32 % 128 == 0 for h in plan.heads.values())
    text = format_summary(plan_summary(model, plan), plan)
    assert "requested 7" in text and "achieved 4" in text


def test_head_dim_64_any_count_aligns():
    """SmolLM2-like shapes (head_dim 64, 9 query heads, 3 KV groups): alignment to 64 changes nothing."""
    model = _llama(9, 3, layers=2, head_dim=64, inter=64)
    scores = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    for count in range(0, 17):
        a = quiet(select_heads, model, scores, count=count, multiple=64)
        b = quiet(select_heads, model, scores, count=count, multiple=1)
        assert a == b


def test_kv_group_granularity_from_head_and_group_scores():
    model = MODELS["gqa"]  # 4 layers, 12 heads, 4 groups of 3
    head_scores = torch.rand(4, 12, generator=torch.Generator().manual_seed(2))
    group_scores = head_scores.reshape(4, 4, 3).sum(-1)
    a = select_heads(model, head_scores, count=5, granularity="kv_group", multiple=1)
    b = select_heads(model, group_scores, count=5, granularity="kv_group", multiple=1)
    assert a == b and n_removed(a.kv_groups) == 5 and not a.heads
    ranking = sorted((group_scores[l, g].item(), l, g) for l in range(4) for g in range(4))
    assert sorted((l, g) for l, gs in a.kv_groups.items() for g in gs) == sorted((l, g) for _, l, g in ranking[:5])
    pruned = check_applied(model, a)
    assert sum(shapes(pruned)[1]) == 16 - 5
    with pytest.raises(ValueError, match="at most 0 can be removed"):
        select_heads(MODELS["mqa"], torch.rand(4, 4), count=1, granularity="kv_group", multiple=1)
    # protections and alignment hold for groups too: 3 heads x 8 = 24 -> groups move in pairs at 16
    plan = quiet(select_heads, model, head_scores, count=3, granularity="kv_group", multiple=16, protect_last=2)
    assert set(plan.kv_groups) <= {0, 1} and all(len(g) % 2 == 0 for g in plan.kv_groups.values())


@PROPERTY
@given(data=st.data(), name=st.sampled_from(["mha", "gqa", "mqa", "bert"]), fraction=st.floats(0, 0.6))
def test_head_parameter_budget_never_exceeded(data, name, fraction):
    model = MODELS[name]
    n_q, n_kv, _ = shapes(model)
    scores = rand_scores(data, len(n_q), max(n_q), ties=False)
    plan = quiet(select_heads, model, scores, fraction=fraction, budget="parameters", multiple=1)
    info = selection_info(plan)[0]
    assert parameters_removed(model, plan) == info["achieved_parameters"] <= info["requested"]
    if name in ("mha", "bert"):  # uniform per-head cost: as many heads as fit
        per_head = parameters_removed(model, PruningPlan(heads={0: [0]}))
        assert n_removed(plan.heads) == min(info["requested"] // per_head, sum(n - 1 for n in n_q))


# ---- neurons -----------------------------------------------------------------------------------
@PROPERTY
@given(
    data=st.data(),
    name=st.sampled_from(["mha", "gqa2", "bert"]),
    multiple=st.sampled_from([1, 8, 16]),
    quant=st.sampled_from([None, 32]),
    min_neurons=st.integers(1, 20),
    ties=st.booleans(),
)
def test_neuron_selection_invariants(data, name, multiple, quant, min_neurons, ties):
    model = MODELS[name]
    _, _, sizes = shapes(model)
    n_layers = len(sizes)
    align = multiple if quant is None else max(multiple, quant)  # lcm here: all powers of two
    pf = data.draw(st.integers(0, 1))
    pl = data.draw(st.integers(0, n_layers - 1 - pf))
    scores = list(rand_scores(data, n_layers, max(sizes), ties))
    removals = []
    for l, n in enumerate(sizes):
        protected = l < pf or l >= n_layers - pl
        removals.append({0} | ({n - k for k in range(max(min_neurons, 1), n) if k % align == 0} if not protected else set()))
    count = data.draw(st.integers(0, sum(max(r) for r in removals)))
    plan = quiet(select_neurons, model, scores, count=count, multiple=multiple, quant_group_size=quant,
                 min_neurons=min_neurons, protect_first=pf, protect_last=pl)
    assert n_removed(plan.neurons) == best_achievable(removals, count)
    if align == 1:
        assert n_removed(plan.neurons) == count
    for l, neurons in plan.neurons.items():
        assert not (l < pf or l >= n_layers - pl)
        kept = sizes[l] - len(neurons)
        assert kept >= max(min_neurons, 1) and kept % align == 0
        # within a layer the lowest-ranked neurons go
        gone = set(neurons)
        worst_kept = min((scores[l][i].item(), i) for i in range(sizes[l]) if i not in gone)
        assert all((scores[l][i].item(), i) < worst_kept for i in gone)
    check_applied(model, plan)


@PROPERTY
@given(data=st.data(), ties=st.booleans())
def test_unconstrained_neurons_are_the_lowest_by_score_layer_index(data, ties):
    model = MODELS["bert"]
    _, _, sizes = shapes(model)
    scores = rand_scores(data, len(sizes), sizes[0], ties)
    count = data.draw(st.integers(0, sum(sizes) // 2))
    ranking = sorted((scores[l, i].item(), l, i) for l in range(len(sizes)) for i in range(sizes[l]))[:count]
    assume(all(sum(1 for _, ll, _ in ranking if ll == l) < sizes[l] for l in range(len(sizes))))
    plan = select_neurons(model, scores, count=count, multiple=1)  # a [L, I] tensor is accepted too
    assert sorted((l, i) for l, ns in plan.neurons.items() for i in ns) == sorted((l, i) for _, l, i in ranking)


def test_neurons_never_empty_a_layer_and_respect_protection():
    model = MODELS["mha"]  # 4 layers x 48 neurons
    scores = [torch.full((48,), -100.0), torch.zeros(48), torch.zeros(48), torch.full((48,), -100.0)]
    plan = select_neurons(model, scores, count=60, multiple=1, protect_last=1)
    assert 3 not in plan.neurons and len(plan.neurons[0]) == 47  # layer 0 keeps one neuron
    assert n_removed(plan.neurons) == 60
    with pytest.raises(ValueError, match=r"144 neurons requested but at most 141 can be removed"):
        select_neurons(model, scores, count=144, multiple=1, protect_last=1)


@PROPERTY
@given(data=st.data(), fraction=st.floats(0, 0.6), multiple=st.sampled_from([1, 16]))
def test_neuron_parameter_budget_never_exceeded(data, fraction, multiple):
    model = MODELS["gqa"]
    _, _, sizes = shapes(model)
    scores = list(rand_scores(data, len(sizes), sizes[0], ties=True))
    plan = quiet(select_neurons, model, scores, fraction=fraction, budget="parameters", multiple=multiple)
    info = selection_info(plan)[0]
    per_neuron = parameters_removed(model, PruningPlan(neurons={0: [0]}))
    assert parameters_removed(model, plan) == info["achieved_parameters"] <= info["requested"]
    assert info["requested"] - info["achieved_parameters"] < per_neuron * multiple  # nothing more fitted


def test_fallback_for_huge_irregular_problems_stays_within_budget(monkeypatch):
    """Past the DP size limit a skip-greedy is used: still valid, never above the request."""
    import course_lib.selection as selection

    monkeypatch.setattr(selection, "_DP_CELL_LIMIT", 0)
    model = MODELS["gqa"]
    scores = torch.rand(4, 12, generator=torch.Generator().manual_seed(7))
    for count in range(0, 30, 3):
        plan = quiet(select_heads, model, scores, count=count, multiple=1, protect_first=1)
        assert n_removed(plan.heads) <= count and 0 not in plan.heads
        check_applied(model, plan)


# ---- layers, spans, merging ------------------------------------------------------------------------
def test_select_layers_and_span():
    model = MODELS["mha"]
    plan = select_layers(model, torch.tensor([0.0, 0.0, 5.0, -1.0]), count=2)
    assert plan.layers == [0, 3]
    plan = select_layers(model, torch.tensor([0.0, 0.0, 5.0, -1.0]), count=2, protect_last=1)
    assert plan.layers == [0, 1]
    assert select_layers(model, torch.zeros(4), fraction=0.5).layers == [0, 1]
    with pytest.raises(ValueError, match=r"count=4 is out of range \[0, 3\]"):
        select_layers(model, torch.zeros(4), count=4)
    with pytest.raises(ValueError, match="only 1 are unprotected"):
        select_layers(model, torch.zeros(4), count=2, protect_first=2, protect_last=1)
    with pytest.raises(ValueError, match=r"scores has shape \(3,\)"):
        select_layers(model, torch.zeros(3), count=1)
    assert select_span(1, 2, model=model).layers == [1, 2]
    with pytest.raises(ValueError, match="start \\+ n = 5 but the model has 4 layers"):
        select_span(2, 3, model=model)
    with pytest.raises(ValueError, match="n must be >= 1"):
        select_span(0, 0)
    check_applied(model, select_span(1, 2, model=model))


def test_merge_plans():
    model = MODELS["gqa"]  # 12 heads in 4 groups of 3
    scores = torch.rand(4, 12, generator=torch.Generator().manual_seed(3))
    heads = select_heads(model, scores, count=12, multiple=1)
    neurons = select_neurons(model, list(torch.rand(4, 48, generator=torch.Generator().manual_seed(4))),
                             count=40, multiple=8)
    layers = PruningPlan(layers=[1])
    groups = PruningPlan(kv_groups={2: [0]}, heads={2: [0, 1, 2]})
    merged = merge_plans(heads, neurons, layers, model=model)
    assert merged.layers == [1] and 1 not in merged.heads and 1 not in merged.neurons
    assert all(merged.heads[l] == heads.heads[l] for l in merged.heads)
    assert all(merged.neurons[l] == neurons.neurons[l] for l in merged.neurons)
    assert [i["kind"] for i in selection_info(merged)] == ["select_heads", "select_neurons"]
    check_applied(model, merged)
    assert merge_plans(groups, model=model) == PruningPlan(kv_groups={2: [0]})  # the group takes its heads
    with pytest.raises(ValueError, match="unequal query heads"):
        merge_plans(PruningPlan(heads={0: [0]}), PruningPlan(heads={0: [3, 4]}), model=model)


# ---- summary and serialisation ---------------------------------------------------------------------
def test_summary_matches_pruned_model_and_json_round_trips():
    model = MODELS["gqa2"]
    heads = select_heads(model, torch.rand(3, 8, generator=torch.Generator().manual_seed(5)), count=6, multiple=16)
    with pytest.warns(UserWarning, match="43 neurons requested but only 32 are achievable"):
        neurons = select_neurons(model, list(torch.rand(3, 48, generator=torch.Generator().manual_seed(6))),
                                 fraction=0.3, multiple=16, protect_first=1)
    plan = merge_plans(heads, neurons, model=model)
    rows = plan_summary(model, plan)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"layer", "removed", "heads_before", "heads_after", "kv_before", "kv_after",
                            "neurons_before", "neurons_after", "params_before", "params_after"}
    check_applied(model, plan)
    text = format_summary(rows, plan)
    lines = text.splitlines()
    assert len({len(line) for line in lines[:2 + len(rows)]}) == 1  # fixed width
    assert "total" in text and "select_neurons: requested" in text
    assert PruningPlan.from_json(plan.to_json()) == plan
    json.loads(plan.to_json())


# ---- errors ----------------------------------------------------------------------------------------
BAD_HEADS = [
    (dict(fraction=1.0), r"fraction must be in \[0, 1\)"),
    (dict(fraction=-0.1), r"fraction must be in \[0, 1\)"),
    (dict(), "exactly one of fraction and count"),
    (dict(fraction=0.1, count=1), "exactly one of fraction and count"),
    (dict(count=-1), "count must be >= 0"),
    (dict(count=25), r"count=25 is out of range \[0, 24\]"),
    (dict(count=1, protect_first=3, protect_last=1), "protect_first \\+ protect_last = 4 but the model has 4 layers"),
    (dict(count=1, multiple=0), "multiple must be >= 1"),
    (dict(count=1, quant_group_size=0), "quant_group_size must be >= 1"),
    (dict(count=1, budget="flops"), r"budget='flops' is unknown; allowed values: \['structures', 'parameters'\]"),
    (dict(count=1, granularity="head"), r"granularity='head' is unknown; allowed values: \['query', 'kv_group'\]"),
    (dict(count=1, min_heads=0), "min_heads must be >= 1"),
    (dict(count=3), "at most 0 can be removed"),  # default multiple=64 on head_dim 8 with 6 heads
]


@pytest.mark.parametrize("kwargs, message", BAD_HEADS)
def test_head_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_heads(MODELS["mha"], torch.rand(4, 6), **kwargs)


def test_score_shape_and_value_errors():
    model = MODELS["gqa"]
    with pytest.raises(ValueError, match=r"scores has shape \(4, 4\) but select_heads\(granularity='query'\) needs \(4, 12\)"):
        select_heads(model, torch.rand(4, 4), count=1, multiple=1)
    with pytest.raises(ValueError, match=r"needs \(4, 12\) \[num_layers, max query heads\] or \(4, 4\)"):
        select_heads(model, torch.rand(4, 5), count=1, granularity="kv_group", multiple=1)
    bad = torch.rand(4, 12)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        select_heads(model, bad, count=1, multiple=1)
    with pytest.raises(ValueError, match="scores has 3 entries but the model has 4 layers"):
        select_neurons(model, [torch.rand(48)] * 3, count=1)
    with pytest.raises(ValueError, match=r"scores\[1\] has shape \(47,\)"):
        select_neurons(model, [torch.rand(48), torch.rand(47), torch.rand(48), torch.rand(48)], count=1)
    with pytest.raises(ValueError, match="min_neurons must be >= 1"):
        select_neurons(model, [torch.rand(48)] * 4, count=1, min_neurons=0)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        select_layers(model, torch.rand(4), fraction=1.5)
    with pytest.raises(ValueError, match="protect_first \\+ protect_last = 7 but the model has 4 layers"):
        select_neurons(model, [torch.rand(48)] * 4, count=1, protect_first=3, protect_last=4)
