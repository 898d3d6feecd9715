"""Figures a notebook measured, kept for the notebooks after it.

Notebook 10 answers the lesson's interview questions with the course's own numbers: the cliffs
and schedules of notebook 07 took minutes of training, the layer oracle of notebook 04 thirty
perplexity runs. Re-measuring them there would double the course's running time, and quoting
them as constants would go stale the moment a learner changes a setting. So each notebook
``record``\\ s its headline figures when it has measured them (JSON under the cache, per profile),
and a later notebook ``recall``\\ s them, or is told which notebook to run first.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from .data import atomic_write
from .errors import SettingError
from .paths import cache_dir
from .profiles import get_profile

NOTEBOOKS = {
    "01": "01_why_structure_matters.ipynb",
    "03": "03_head_pruning.ipynb",
    "04": "04_layer_pruning.ipynb",
    "07": "07_iterative_vs_one_shot.ipynb",
    "08": "08_prune_recover_quantize.ipynb",
}


def results_path(notebook: str, profile: str | None = None) -> Path:
    return cache_dir() / "results" / get_profile(profile).name / f"{notebook}.json"


def _plain(value):
    """``value`` as JSON can hold it: mapping keys become strings, tensors and tuples lists, floats stay floats."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf / nan; the string says which it was
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SettingError(f"cannot record a {type(value).__name__}; record numbers, strings, lists, dicts or tensors")


def record(notebook: str, profile: str | None = None, **figures) -> Path:
    """Store ``figures`` as notebook ``notebook``'s results under ``profile``, replacing earlier ones whole."""
    if notebook not in NOTEBOOKS:
        raise SettingError(f"notebook={notebook!r} is not one that records results; allowed: {', '.join(NOTEBOOKS)}")
    if not figures:
        raise SettingError("record needs at least one figure (keyword arguments)")
    content = {"notebook": NOTEBOOKS[notebook], "profile": get_profile(profile).name,
               "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"), "figures": _plain(figures)}
    path = results_path(notebook, profile)
    atomic_write(path, json.dumps(content, indent=1).encode())
    return path


def recall(notebook: str, profile: str | None = None) -> dict:
    """The figures notebook ``notebook`` recorded under ``profile``; an error naming the notebook to run if none."""
    if notebook not in NOTEBOOKS:
        raise SettingError(f"notebook={notebook!r} is not one that records results; allowed: {', '.join(NOTEBOOKS)}")
    path = results_path(notebook, profile)
    if not path.exists():
        raise SettingError(f"no results of notebook {notebook} for the {get_profile(profile).name} profile yet: run "
                           f"notebooks/{NOTEBOOKS[notebook]} first (it records them in {path})")
    return json.loads(path.read_text())["figures"]
