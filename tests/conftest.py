"""Shared fixtures."""

import platform
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models and one-token decoding gain nothing from a second intra-op thread, and on a
    2-core machine shared with another process two OpenMP threads stall each other (10x slower
    seen). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the machine at the end of the log: the notebooks' timing checks and the suite's duration
    depend on the CPU (the same suite took 17 to 52 minutes on 2-core machines), and a CI
    log shows a failing cell's traceback but not what the cell printed."""
    terminalreporter.write_line(
        f"machine: {_cpu_model()}; torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"CPU kernels {torch.backends.cpu.get_cpu_capability()}")
