"""Where files go: the git-ignored cache (``data/cache`` in a checkout, or ``$COURSE_CACHE``), and
directories written all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    path = Path(os.environ.get("COURSE_CACHE", REPO_ROOT / "data" / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def staged_directory(dest: Path) -> Iterator[Path]:
    """Write a directory all or nothing: yields a fresh sibling to fill, renamed over ``dest`` on
    success and removed on error, so a crash never leaves a half-written checkpoint that a later
    load would trust. An existing ``dest`` is replaced only once the new one is complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        yield staged
        shutil.rmtree(dest, ignore_errors=True)
        staged.rename(dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
