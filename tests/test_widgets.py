"""The head-pruning explorer, driven headless: set the slider, assert on what it computed."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from course_lib.evaluate import count_parameters
from course_lib.plan import PruningPlan
from course_lib.selection import select_heads
from course_lib.surgery import apply_plan, parameters_removed
from course_lib.widgets import head_pruning_explorer, plan_matrix, plot_plan

SELECT = {"protect_first": 0, "protect_last": 1, "min_heads": 1, "multiple": 1}


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def scores():
    return torch.rand(3, 4, generator=torch.Generator().manual_seed(1))


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (8, 10), generator=g), torch.randint(0, 2, (8,), generator=g)


def _accuracy(model):
    ids, labels = _data()
    with torch.no_grad():
        return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def _explorer(model, scores, **kwargs):
    options = dict(quality=_accuracy, latency_kwargs={"batch": 1, "seq": 8, "warmup": 0, "repeats": 1},
                   select_kwargs=SELECT, max_fraction=0.75, step=0.25)
    options.update(kwargs)
    return head_pruning_explorer(model, scores, **options)


def test_a_slider_step_of_one_twelfth_requests_one_head_in_twelve(tiny_bert, scores):
    """The cache key is the fraction to 4 decimals, but selection takes the slider's value:
    0.0833 x 12 heads would floor to 0 heads, 1/12 x 12 is 1."""
    _, explorer = _explorer(tiny_bert, scores, step=1 / 12)
    explorer.slider.value = explorer.slider.step
    assert explorer.current.requested_heads == 1


def test_slider_selects_the_plan_and_counts_parameters(tiny_bert, scores):
    before = copy.deepcopy(tiny_bert.state_dict())
    widget, explorer = _explorer(tiny_bert, scores)
    assert explorer.current.fraction == 0.0 and explorer.current.removed_heads == 0
    assert explorer.current.params == count_parameters(tiny_bert)

    explorer.slider.value = 0.5
    r = explorer.current
    expected = select_heads(tiny_bert, scores, fraction=0.5, **SELECT)
    assert r.fraction == 0.5
    assert r.plan == expected
    # 12 heads, layer 2 protected: 6 of the 8 unprotected heads go, the lowest-scored ones
    assert r.requested_heads == 6 and r.removed_heads == 6
    assert 2 not in r.plan.heads
    flat = [(float(scores[l, h]), l, h) for l in range(2) for h in range(4)]
    lowest = sorted(flat)[:6]
    assert sorted((l, h) for _, l, h in lowest) == sorted((l, h) for l, hs in r.plan.heads.items() for h in hs)
    # parameters: the plan's arithmetic, equal to what surgery leaves
    assert r.params_removed == parameters_removed(tiny_bert, expected) == 6 * 8 * (3 * 33 + 32)
    assert r.params == count_parameters(tiny_bert) - r.params_removed
    assert r.latency_ms is not None and r.latency_ms > 0
    assert r.quality == _accuracy(apply_plan(copy.deepcopy(tiny_bert), expected))
    # the heatmap is the plan
    assert np.array_equal(r.matrix, plan_matrix(tiny_bert, expected))
    assert int((r.matrix == 0).sum()) == 6 and int((r.matrix == 1).sum()) == 6
    assert "6 heads removed" in explorer.label.value
    assert explorer.figure is not None
    # the model the widget explores is never changed
    after = tiny_bert.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(tiny_bert).__name__ == "BertForSequenceClassification"


def test_results_are_cached_per_fraction(tiny_bert, scores):
    _, explorer = _explorer(tiny_bert, scores, draw=False)
    explorer.slider.value = 0.25
    explorer.slider.value = 0.5
    built = explorer.measurements
    assert built == 3  # 0.0 at start, 0.25, 0.5
    explorer.slider.value = 0.25
    explorer.slider.value = 0.0
    explorer.slider.value = 0.5
    assert explorer.measurements == built
    assert set(explorer.cache) == {0.0, 0.25, 0.5}
    assert explorer.current is explorer.cache[0.5]


def test_alignment_rounds_down_and_is_reported(tiny_bert, scores):
    # head_dim 8 aligned to 16 -> a pruned layer keeps an even number of heads (steps of 2)
    _, explorer = _explorer(tiny_bert, scores, select_kwargs={**SELECT, "multiple": 16}, quality=None,
                            latency_kwargs=None, draw=False)
    explorer.slider.value = 0.25  # 3 requested
    r = explorer.current
    assert r.requested_heads == 3 and r.removed_heads == 2
    assert all(len(h) % 2 == 0 for h in r.plan.heads.values())
    assert r.latency_ms is None and r.quality is None
    assert "requested 3" in explorer.label.value


def test_gqa_plan_matrix_and_explorer():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    plan = PruningPlan(kv_groups={0: [1]}, heads={1: [0, 3]})
    m = plan_matrix(model, plan)
    assert m.shape == (2, 6)
    assert m[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert m[1].tolist() == [0, 1, 1, 0, 1, 1]
    ax = plot_plan(model, plan)
    assert "5 of 12 heads removed" in ax.get_title()
    matplotlib.pyplot.close(ax.figure)
    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    _, explorer = head_pruning_explorer(model, scores, select_kwargs={"multiple": 1}, draw=False)
    explorer.slider.value = 0.5
    r = explorer.current
    assert r.removed_heads == 6
    assert r.params == count_parameters(model) - parameters_removed(model, r.plan)
