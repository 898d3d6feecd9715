"""The setup contract: one pinned list of dependencies, two commands, and a CI that calls them."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from course_lib.profiles import PROFILES, get_profile

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _environment_pip_pins():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]


def test_environment_yml_matches_requirements():
    assert _environment_pip_pins() == _pins((ROOT / "requirements.txt").read_text().splitlines())


def test_every_dependency_is_pinned_exactly():
    for name in ("requirements.txt", "requirements-nodeps.txt", "requirements-browser.txt"):
        for pin in _pins((ROOT / name).read_text().splitlines()):
            assert "==" in pin, f"{name}: {pin!r} is not pinned with =="


def test_torch_is_the_cpu_pin_installed_first():
    assert _pins((ROOT / "requirements.txt").read_text().splitlines())[0] == "torch==2.13.0"
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("install torch==2.13.0") < makefile.index("install -r requirements.txt")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _recipe(rule: str) -> list[str]:
    """The lines of the Makefile recipe under ``rule`` (its ``target: prerequisites`` line)."""
    return (ROOT / "Makefile").read_text().split(f"\n{rule}\n", 1)[1].split("\n\n", 1)[0].splitlines()


def test_make_test_installs_the_browser_test_dependencies():
    """The browser test skips without Playwright and Chromium; `make test` must try to provide them."""
    makefile = (ROOT / "Makefile").read_text()
    assert _recipe("test: setup")[0].split()[-2:] == ["baseline", "browser"]
    assert "install -r requirements-browser.txt" in makefile and "apt-get install -y -q chromium" in makefile


def test_make_test_fine_tunes_the_baseline_on_all_cores_before_the_workers_start():
    """The baseline's fine-tuning and the browser's install run as two make jobs (they overlap),
    both before the first pytest command."""
    assert [line.strip() for line in _recipe("baseline: setup")] == ["$(PY) -m course_lib.fetch --baseline"]
    first, *rest = _recipe("test: setup")
    assert shlex.split(first.strip()) == ["$(MAKE)", "--no-print-directory", "-j2", "baseline", "browser"]
    assert "-m pytest" in rest[1] and not any("baseline" in line for line in rest)


def _make_test_pytest_runs() -> list[list[str]]:
    """The arguments of each pytest command in the Makefile's ``test`` recipe, in order."""
    return [shlex.split(line.split("||")[0].split("-m pytest", 1)[1]) for line in _recipe("test: setup")
            if "-m pytest" in line]


def test_make_test_runs_the_timed_notebooks_alone_after_everything_else():
    """tests/ and the notebooks that time nothing may share the cores between xdist workers (each
    notebook on one worker: its cells share a kernel); the timed notebooks may not."""
    shared, alone = _make_test_pytest_runs()
    assert shared[-2:] == ["tests", "notebooks"] and "-n" in shared
    assert shared[shared.index("--dist") + 1] == "loadfile" and "--no-loadscope-reorder" in shared and shared[shared.index("-m") + 1] == "not timed"
    assert alone[-1] == "notebooks" and "-n" not in alone and alone[alone.index("-m") + 1] == "timed"


TIMING_CALLS = re.compile(r"\b(timing\.\w+|latency|compare_latency|matmul_time|check_capstone)\(")


def test_every_notebook_that_times_models_runs_alone():
    """A notebook calling the course's timing functions belongs in conftest.TIMED_NOTEBOOKS: on a
    shared worker, a neighbour's work would move the ratios its checks assert."""
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    TIMED_NOTEBOOKS = root_conftest.TIMED_NOTEBOOKS
    stems = {path.stem: path for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert TIMED_NOTEBOOKS <= set(stems), TIMED_NOTEBOOKS - set(stems)
    timing = {stem for stem, path in stems.items()
              if any(TIMING_CALLS.search("".join(cell["source"]))
                     for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code")}
    assert timing, "no notebook calls a timing function: the pattern is stale"
    assert timing <= TIMED_NOTEBOOKS, f"time models but share the cores: {sorted(timing - TIMED_NOTEBOOKS)}"


def test_a_test_worker_and_the_processes_it_starts_get_their_share_of_the_cores():
    """Under `make test`'s two workers, two threads each would put four OpenMP threads on two cores."""
    import os
    import subprocess
    import sys

    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers == 1:
        pytest.skip("not under pytest-xdist: this process keeps torch's own thread count")
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    share = max(1, len(os.sched_getaffinity(0)) // workers)
    assert torch.get_num_threads() == int(child.stdout) == share


def test_profiles_change_sizes_not_fields():
    assert {f for f in vars(PROFILES["ci"])} == {f for f in vars(PROFILES["full"])}
    assert PROFILES["ci"].calib_samples < PROFILES["full"].calib_samples


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "full")
    assert get_profile().name == "full"
    monkeypatch.setenv("COURSE_PROFILE", "gpu-please")
    with pytest.raises(ValueError, match=r"profile='gpu-please' is unknown; choose one of \['ci', 'full'\]"):
        get_profile()
