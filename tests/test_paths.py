"""Directories are written all or nothing."""

import pytest

from course_lib.paths import staged_directory


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
