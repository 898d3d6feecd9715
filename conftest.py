"""What every pytest run of the repository shares, the notebooks' included: the threads each test
process gets, and the machine named at the end of the log."""

import os
import platform
from pathlib import Path

import torch


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _threads_per_process(workers: int) -> int:
    return max(1, _cores() // workers)


# `make test` runs tests/ on two pytest-xdist workers (the notebooks run afterwards, alone): each
# worker, and every process its tests start (CLI runs, fresh-process reloads, JupyterLab's kernel),
# gets its share of the cores, so that two workers never put four OpenMP threads on two cores.
# Measured on a 2-core EPYC: tests/ in 201 s on two one-thread workers against 320 s in one process
# with two threads (the MiniLM baseline already cached).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    share = _threads_per_process(WORKERS)
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)
THREADS = torch.get_num_threads()


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
