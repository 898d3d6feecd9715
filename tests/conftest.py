"""Shared fixtures of the unit tests (the threads of each test process: the repository's conftest.py)."""

from collections.abc import Iterator

import pytest
import torch


THREADS = torch.get_num_threads()  # read before any test module is imported


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models and one-token decoding gain nothing from a second intra-op thread, and on a
    2-core machine shared with another process two OpenMP threads stall each other (10x slower
    seen). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_finish(session) -> None:
    """Fail at once when importing a test module changed torch's thread count: pytest imports every
    module before the first test, so one module-level ``torch.set_num_threads(1)`` ran the whole
    suite on one thread (tests/test_selection.py did: the browser test's set-up, which fine-tunes the
    MiniLM baseline, took 260 s instead of 182 s on an AVX2 EPYC). Modules that want one thread use the ``one_thread`` fixture."""
    if torch.get_num_threads() != THREADS:
        raise pytest.UsageError(f"a test module set torch's threads to {torch.get_num_threads()} (from {THREADS}) "
                                "when imported; use the one_thread fixture instead")


@pytest.fixture(autouse=True, scope="module")
def _threads_restored() -> Iterator[None]:
    """A module's tests must leave torch's thread count as they found it."""
    yield
    assert torch.get_num_threads() == THREADS, f"the module's tests left torch with {torch.get_num_threads()} threads"
