"""Notebook 10's capstone check: its rules, the widths it reads, and the fresh-process reload."""

import pytest
import torch

from course_lib.exercises import CheckFailed
from course_lib.exercises.capstone import (Target, architecture, fresh_reload_matches, judge, load_candidate,
                                          unaligned_widths)
from course_lib.plan import PruningPlan
from course_lib.surgery import apply_plan
from tests.tiny import wide_llama

PASSING = {"reloads": True, "unaligned": [], "removed_share": 0.2, "perplexity_ratio": 1.2, "decode_speedup": 1.5}


def test_a_model_meeting_every_target_gets_every_point():
    report = judge(PASSING)
    assert (report.points, report.total, report.missing) == (100, 100, [])
    report.assert_passed()


def test_each_shortfall_is_named_with_what_was_measured_and_required():
    report = judge({**PASSING, "decode_speedup": 1.1, "unaligned": ["layer 3 MLP 1130"], "reloads": "different logits"})
    assert report.points == 100 - 40 - 10 - 10
    assert report.missing == ["reloads in a fresh process: measured different logits, required identical logits",
                              "widths multiples of 64: measured layer 3 MLP 1130, required all",
                              "decode speed / dense fp32: measured 1.10x, required >= 1.30x"]
    with pytest.raises(CheckFailed, match=r"decode speed / dense fp32: measured 1.10x"):
        report.assert_passed()


def test_thresholds_are_inclusive_and_follow_the_target():
    exactly = judge({**PASSING, "removed_share": 3 / 30 * (1 - 1e-12), "perplexity_ratio": 1.5, "decode_speedup": 1.3})
    assert exactly.missing == []
    stricter = judge(PASSING, Target(decode_speedup=1.6, perplexity_ratio=1.1, removed_share=0.25))
    assert [m.split(":")[0] for m in stricter.missing] == ["decoder-layer parameters removed", "perplexity / dense",
                                                          "decode speed / dense fp32"]


def test_unaligned_widths_are_read_from_the_saved_architecture(tmp_path):
    model = apply_plan(wide_llama(), PruningPlan(neurons={1: list(range(8))}, kv_groups={2: [1]}))
    model.save_pretrained(tmp_path)
    shape = architecture(tmp_path)
    assert next(shape.parameters()).device.type == "meta"
    assert unaligned_widths(shape, 8) == []
    assert unaligned_widths(shape, 16) == ["layer 1 MLP 24", "layer 2 KV 8"]
    assert unaligned_widths(shape, 32) == ["layer 0 KV 16", "layer 1 MLP 24", "layer 1 KV 16", "layer 2 query 16",
                                           "layer 2 KV 8", "layer 3 KV 16"]


def test_a_saved_model_reloads_in_a_fresh_process_with_the_same_logits(tmp_path):
    model = apply_plan(wide_llama(), PruningPlan(layers=[1]))
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = load_candidate(tmp_path)(ids).logits.float()
    assert fresh_reload_matches(tmp_path, ids, logits) is True
    assert fresh_reload_matches(tmp_path, ids, logits + 1) == "different logits"
    assert fresh_reload_matches(tmp_path / "nowhere", ids, logits).startswith("did not load: FileNotFoundError")


def test_a_directory_without_a_model_says_how_to_save_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained .* course_lib.lowbit.save"):
        load_candidate(tmp_path)
