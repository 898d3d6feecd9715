"""Notebook 03's exercise checks on tiny random models: the right answer passes, each usual mistake is named."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from course_lib.exercises import CheckFailed
from course_lib.exercises.heads import check_head_selection, check_head_surgery
from course_lib.plan import PruningPlan
from course_lib.selection import select_heads
from course_lib.surgery import apply_plan


@pytest.fixture(scope="module")
def bert():
    """4 layers of 4 heads: enough for protections, a minimum and a global ranking to matter."""
    torch.manual_seed(1)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=24, max_position_embeddings=32)
    return BertModel(config).eval()


# ----------------------------------------------------------------------------- surgery


def _linear(weight, bias):
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def surgery(rows_of, *, o_dim=1, q_bias=True, o_bias=True, update_counts=True, o=True):
    """A learner's surgery with switches for the usual mistakes; ``rows_of(kept, removed, n, d)`` gives q/k/v rows."""

    def fn(block, heads):
        attention, output = block.attention.self, block.attention.output
        n, d = attention.num_attention_heads, attention.attention_head_size
        kept = [h for h in range(n) if h not in heads]
        rows = torch.tensor(rows_of(kept, heads, n, d))
        for name in ("query", "key", "value"):
            lin = getattr(attention, name)
            setattr(attention, name, _linear(lin.weight[rows], lin.bias[rows] if q_bias else None))
        if o:
            dense = output.dense
            weight = dense.weight[:, rows] if o_dim == 1 else dense.weight[rows]
            bias = (dense.bias[rows] if o_dim == 0 else dense.bias) if o_bias else None
            output.dense = _linear(weight, bias)
        if update_counts:
            attention.num_attention_heads, attention.all_head_size = len(kept), len(kept) * d

    return fn


def blocks_of(kept, removed, n, d):
    return [h * d + i for h in kept for i in range(d)]


SURGERY_WRONG = {
    "kept the listed": (surgery(lambda kept, removed, n, d: [h * d + i for h in removed for i in range(d)]),
                        "rows of the listed heads"),
    "one row per head": (surgery(lambda kept, removed, n, d: [r for r in range(n * d) if r not in removed]),
                         "one row per head"),
    "strided": (surgery(lambda kept, removed, n, d: [h + n * i for h in kept for i in range(d)]), "CONSECUTIVE"),
    "no bias": (surgery(blocks_of, q_bias=False), "needs a bias"),
    "O rows": (surgery(blocks_of, o_dim=0), "COLUMNS of O"),
    "O untouched": (surgery(blocks_of, o=False), "input columns of O must go too"),
    "O bias dropped": (surgery(blocks_of, o_bias=False), "bias must stay"),
    "counts stale": (surgery(blocks_of, update_counts=False), "num_attention_heads"),
}


def test_surgery_check_accepts_the_right_answer_and_returns_the_pruned_copy(bert):
    mine = check_head_surgery(surgery(blocks_of), bert, 2, [1, 2])
    ref = apply_plan(copy.deepcopy(bert), PruningPlan(heads={2: [1, 2]}))
    assert mine.encoder.layer[2].attention.self.query.out_features == 16
    assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), ref.parameters()))
    assert bert.encoder.layer[2].attention.self.query.out_features == 32, "the model itself is not changed"


@pytest.mark.parametrize("name", sorted(SURGERY_WRONG))
def test_surgery_check_names_the_mistake(bert, name):
    fn, fragment = SURGERY_WRONG[name]
    with pytest.raises(CheckFailed, match=fragment):
        check_head_surgery(fn, bert, 2, [1, 2])


# ----------------------------------------------------------------------------- selection


def lowest(scores, count, protect_first, protect_last, min_heads):
    n_layers, n_heads = scores.shape
    order = sorted((float(scores[i, h]), i, h) for i in range(protect_first, n_layers - protect_last)
                   for h in range(n_heads))
    chosen: dict[int, list[int]] = {}
    for _, i, h in order:
        if sum(map(len, chosen.values())) == count:
            break
        if n_heads - len(chosen.get(i, [])) > min_heads:
            chosen.setdefault(i, []).append(h)
    return chosen


def no_protection(scores, count, protect_first, protect_last, min_heads):
    return lowest(scores, count, 0, 0, min_heads)


def no_minimum(scores, count, protect_first, protect_last, min_heads):
    return lowest(scores, count, protect_first, protect_last, 0)


def highest(scores, count, protect_first, protect_last, min_heads):
    return lowest(-scores, count, protect_first, protect_last, min_heads)


def per_layer(scores, count, protect_first, protect_last, min_heads):
    layers = range(protect_first, scores.shape[0] - protect_last)
    share = count // len(layers)
    return {i: torch.argsort(scores[i])[: share + (j < count % len(layers))].tolist() for j, i in enumerate(layers)}


def one_short(scores, count, protect_first, protect_last, min_heads):
    return lowest(scores, count - 1, protect_first, protect_last, min_heads)


SELECTION_WRONG = {
    "protections": (no_protection, "protected layer"),
    "minimum": (no_minimum, "fewer than min_heads"),
    "highest": (highest, "HIGHEST"),
    "per layer": (per_layer, "same number of heads from every layer"),
    "count": (one_short, "count asks for"),
}


@pytest.fixture(scope="module")
def scores():
    return torch.rand(4, 4, generator=torch.Generator().manual_seed(5))


def test_selection_check_accepts_the_right_answer(bert, scores):
    got = check_head_selection(lowest, bert, scores, 3, protect_first=1, protect_last=1)
    plan = select_heads(bert, scores, count=3, protect_first=1, protect_last=1, multiple=1)
    assert got == {i: sorted(h) for i, h in plan.heads.items()}


@pytest.mark.parametrize("name", sorted(SELECTION_WRONG))
def test_selection_check_names_the_mistake(bert, scores, name):
    fn, fragment = SELECTION_WRONG[name]
    with pytest.raises(CheckFailed, match=fragment):
        check_head_selection(fn, bert, scores, 3, protect_first=1, protect_last=1)
