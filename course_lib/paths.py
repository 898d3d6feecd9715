"""Where files go: the git-ignored cache (``data/cache`` in a checkout, or ``$COURSE_CACHE``), and
directories written all or nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def build_once(dest: Path, marker: str, build: Callable[[], object]) -> Path:
    """``dest``, after running ``build`` (which writes it whole) unless ``dest / marker`` exists.

    One process builds at a time: a second one that needs the same baseline or checkpoint (two
    notebooks open at once, two pytest-xdist workers) waits for the first to finish and then finds
    it built, instead of training it again and renaming over it while the first one loads it. The
    lock is an advisory ``flock`` on a file in the system's temporary folder named for ``dest``
    (the cache holds only what was built), released when its holder exits, crashes included; where
    ``fcntl`` does not exist (Windows) there is none and a race costs only time.
    """
    dest = Path(dest)
    if (dest / marker).exists():
        return dest
    try:
        import fcntl
    except ImportError:
        fcntl = None
    key = hashlib.sha256(str(dest.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"course_lib-build-{key}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (dest / marker).exists():
            build()
    return dest
