"""Notebook figures kept for later notebooks: what goes in comes back, and a missing one names its notebook."""

import json

import pytest
import torch

from course_lib import results
from course_lib.errors import SettingError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    return tmp_path


def test_figures_round_trip_as_plain_json():
    path = results.record("07", head_cliff={0.15: 0.8, 0.9: 0.6}, final={3: torch.tensor([1.5, 2.0])},
                          edges=("first two", [0, 1]), broken=float("inf"), note=None, profile="ci")
    assert path.parent.name == "ci" and json.loads(path.read_text())["notebook"] == "07_iterative_vs_one_shot.ipynb"
    back = results.recall("07", profile="ci")
    assert back == {"head_cliff": {"0.15": 0.8, "0.9": 0.6}, "final": {"3": [1.5, 2.0]},
                    "edges": ["first two", [0, 1]], "broken": "inf", "note": None}


def test_a_new_record_replaces_the_old_one_whole():
    results.record("04", rho_bi=0.7, bi=[0.1], profile="ci")
    results.record("04", rho_bi=0.8, profile="ci")
    assert results.recall("04", profile="ci") == {"rho_bi": 0.8}


def test_missing_results_name_the_notebook_to_run_and_profiles_are_separate():
    results.record("08", compression_vs_fp16=4.1, profile="ci")
    with pytest.raises(SettingError, match=r"run notebooks/08_prune_recover_quantize.ipynb first"):
        results.recall("08", profile="full")
    with pytest.raises(SettingError, match=r"notebooks/03_head_pruning.ipynb"):
        results.recall("03", profile="ci")


def test_bad_input_is_refused_before_anything_is_written(cache):
    with pytest.raises(SettingError, match=r"notebook='99' .* allowed: 01, 03, 04, 07, 08"):
        results.record("99", x=1)
    with pytest.raises(SettingError, match="cannot record a object"):
        results.record("01", x=object())
    with pytest.raises(SettingError, match="at least one figure"):
        results.record("01")
    assert not list(cache.rglob("*.json"))
