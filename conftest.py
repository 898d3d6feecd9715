"""What every pytest run of the repository shares, the notebooks' included: the threads each test
process gets, and the machine named at the end of the log."""

import os
import platform
from pathlib import Path

import pytest
import torch


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads_per_process(workers: int) -> int:
    return max(1, _cores() // workers)


# `make test` runs tests/ and the notebooks that time nothing on two pytest-xdist workers (the
# timed notebooks run afterwards, alone): each worker, and every process it starts (CLI runs,
# fresh-process reloads, a notebook's kernel, JupyterLab's), gets its share of the cores, so that
# two workers never put four OpenMP threads on two cores.
# Measured on a 2-core EPYC: tests/ in 201 s on two one-thread workers against 320 s in one process
# with two threads (the MiniLM baseline already cached).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    share = _threads_per_process(WORKERS)
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)
THREADS = torch.get_num_threads()


# Notebooks whose cells time models against each other (latency ratios, speedups, a neighbour's
# effect): `make test` runs them last, alone on all the cores (`-m timed`). The others share the
# cores with tests/ on two workers (`-m "not timed"`), one thread each: 02 prints how long its
# scoring methods took, and none of them asserts on a time.
TIMED_NOTEBOOKS = {"01_why_structure_matters", "03_head_pruning", "05_mlp_neuron_pruning",
                   "08_prune_recover_quantize", "09_pipeline_and_benchmarks", "10_interview_and_capstone"}


def pytest_itemcollected(item) -> None:
    """Mark the timed notebooks' cells ``timed`` (``--dist loadfile`` keeps each notebook's cells on
    one worker, and so in one kernel, in order)."""
    if item.path.suffix == ".ipynb" and item.path.stem in TIMED_NOTEBOOKS:
        item.add_marker(pytest.mark.timed)


def pytest_collection_modifyitems(items) -> None:
    """On xdist workers, the notebooks before tests/ (a stable sort: each file keeps its order). The
    scheduler hands out whole files in this order (`make test` turns off its own reordering): the
    untimed notebooks take minutes each, the tests seconds, so the tests fill in at the end and the
    two workers finish together, where a notebook handed out last would leave one worker idle."""
    if WORKERS > 1:
        items.sort(key=lambda item: item.path.suffix != ".ipynb")


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
    workers = getattr(terminalreporter.config.option, "numprocesses", None) or 1  # pytest-xdist's -n
    threads = (f"{_threads_per_process(workers)} threads in each of {workers} workers" if workers > 1
               else f"{THREADS} threads")
    terminalreporter.write_line(f"machine: {_cpu_model()}; torch {torch.__version__} with {threads}, "
                                f"CPU kernels {torch.backends.cpu.get_cpu_capability()}")
