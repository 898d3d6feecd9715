"""Directories are written all or nothing."""

import threading
import time

import pytest

from course_lib.paths import build_once, staged_directory


def test_staged_directory_replaces_only_when_complete(tmp_path):
    dest = tmp_path / "checkpoint"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(dest) as staged:
            (staged / "half.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no staging left behind
    assert [p.name for p in dest.iterdir()] == ["old.txt"]  # the old checkpoint survives intact
    with staged_directory(dest) as staged:
        (staged / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert [p.name for p in dest.iterdir()] == ["new.txt"]


def test_build_once_lets_one_caller_build_while_another_waits(tmp_path):
    """Two xdist workers (or two notebooks) needing the same baseline: one trains it, one waits."""
    dest, builds, started = tmp_path / "baseline", [], threading.Event()

    def build():
        builds.append(threading.current_thread().name)
        started.set()
        time.sleep(0.5)  # the second caller arrives while the first is still building
        with staged_directory(dest) as staged:
            (staged / "metrics.json").write_text("{}")

    first = threading.Thread(target=build_once, args=(dest, "metrics.json", build), name="first")
    first.start()
    assert started.wait(10)
    assert build_once(dest, "metrics.json", build) == dest  # waited, then found it built
    first.join()
    assert builds == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["baseline"]  # no lock file left in the cache
    assert build_once(dest, "metrics.json", lambda: pytest.fail("built twice")) == dest
