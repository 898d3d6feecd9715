"""Notebook 08: the INT4 round-to-nearest check (right and wrong answers), the 4-bit-grid share, and the
group-size explorer (headless), on a tiny random Llama."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib.exercises import CheckFailed
from course_lib.exercises.quantize import (_symmetric, check_rtn_int4, column, grid_share, group_size_explorer,
                                              update_vs_step)
from course_lib.quantize import fake_quantize, rtn_int4


def right(w, group_size):
    """The library's rounding (the notebook's own solution is checked in test_exercise_stubs.py)."""
    return fake_quantize(w, group_size=group_size)


def test_check_rtn_int4_accepts_the_right_answer():
    check_rtn_int4(right)


def unclamped(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    scale = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)).clamp(min=1e-5) / 15
    return (torch.round(g / scale) * scale).reshape(rows, cols)


@pytest.mark.parametrize("wrong,message", [
    (_symmetric, "symmetric grid"),
    (lambda w, g: right(w.t().contiguous(), g).t(), "along a row"),
    (unclamped, "clamp the zero point"),
    (lambda w, g: right(w, g) * 1.01, "differs from the library"),
    (lambda w, g: right(w, g)[:, :-1], "return the dequantized matrix"),
])
def test_check_rtn_int4_names_the_mistake(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_rtn_int4(wrong)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_grid_share_finds_weights_already_on_a_4_bit_grid(llama):
    assert grid_share(llama, group_size=32) == 0.0  # random weights: 32 distinct values per group
    on_grid = rtn_int4(llama, group_size=32)
    assert grid_share(on_grid, group_size=32) == 1.0
    assert grid_share(on_grid, group_size=64) < 0.5  # two groups of 16 levels rarely share their levels
    with pytest.raises(CheckFailed, match="does not divide"):
        grid_share(on_grid, group_size=48)


def test_group_size_explorer_headless(llama):
    dense = llama
    other = LlamaForCausalLM(dense.config).eval()
    table = {"dense": {"RTN g32": 10.0, "RTN g64": 11.0, column(32, "float"): 9.5}, "other": {"RTN g32": 12.0}}
    widget, explorer = group_size_explorer({"dense": dense, "other": other}, table)
    assert explorer.current.group_size == 32 and explorer.current.layer == 0 and explorer.figure is not None
    w = dense.model.layers[0].mlp.down_proj.weight.detach()
    expected = float((w - fake_quantize(w, group_size=32)).norm() / w.norm())
    assert explorer.current.errors["dense"] == pytest.approx(expected)
    assert "dense 10.00, other 12.00" in explorer.label.value
    explorer.group.value = 64  # what a click does
    assert explorer.current.errors["dense"] > expected and "dense 11.00" in explorer.label.value
    explorer.layer.value = 2
    assert explorer.current.layer == 2 and explorer.current.row_errors["other"].shape == (64,)
    explorer.group.value, explorer.layer.value = 32, 0
    explorer.zero.value = "float"
    w_float = fake_quantize(w, group_size=32, zero_point="float")
    assert explorer.current.zero_point == "float"
    assert explorer.current.errors["dense"] == pytest.approx(float((w - w_float).norm() / w.norm()))
    assert column(32, "float") == "RTN g32 float zero"
    assert "float zero point" in explorer.label.value and "perplexity: dense 9.50" in explorer.label.value
    with pytest.raises(CheckFailed, match="zero_point must be one of integer, float"):
        explorer.update(32, 0, "half")
    with pytest.raises(CheckFailed, match="layer must be in 0..2"):
        explorer.update(32, 3)


def test_update_vs_step_sees_an_aligned_grid_round_a_small_update_away(llama):
    def nudged(model, scale):
        copy_ = copy.deepcopy(model)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in copy_.named_parameters():
                if "proj" in name:
                    p.add_(torch.randn_like(p) * scale)
        return copy_

    on_grid = rtn_int4(copy.deepcopy(llama), group_size=32, zero_point="float")
    small = update_vs_step(on_grid, nudged(on_grid, 1e-4), zero_point="float")  # a few % of a step
    assert small.median_steps < 0.05 and small.kept < 0.2  # the weights sit on the grid: rounded back
    dithered = update_vs_step(llama, nudged(llama, 1e-4))  # random weights, anywhere between grid points
    assert dithered.median_steps < 0.05 and 0.7 < dithered.kept < 1.3
    large = update_vs_step(on_grid, nudged(on_grid, 1.0), zero_point="float")
    assert large.median_steps > 1 and 0.8 < large.kept < 1.2
    with pytest.raises(CheckFailed, match="no update"):
        update_vs_step(llama, llama)
