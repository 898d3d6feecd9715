"""Notebook 08: the INT4 round-to-nearest check (right and wrong answers), the 4-bit-grid share, and the
group-size explorer (headless), on a tiny random Llama."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib.exercises import CheckFailed
from course_lib.exercises.quantize import _symmetric, check_rtn_int4, grid_share, group_size_explorer
from course_lib.quantize import fake_quantize, rtn_int4


def right(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / 15
    zero = (-torch.round(low / scale)).clamp(0, 15)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(rows, cols)


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
    table = {"dense": {"RTN g32": 10.0, "RTN g64": 11.0}, "other": {"RTN g32": 12.0}}
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
    with pytest.raises(CheckFailed, match="layer must be in 0..2"):
        explorer.update(32, 3)
