"""Wall time of each course notebook, executed end to end the way nbval runs it, and whether its
outputs repeat from one run to the next.

    .venv/bin/python benchmarks/notebook_times.py                 # every notebook, twice
    .venv/bin/python benchmarks/notebook_times.py --runs 1 03 04  # just these, once

Each notebook runs in a fresh kernel of this environment (``nbclient``, the executor nbval uses),
in the profile from ``COURSE_PROFILE`` (ci by default). The budget is 4 min per notebook on an
idle 2-core machine, so run it with nothing else busy: ``uptime`` before and after is printed.
With two runs, every code cell's text outputs are compared; cells whose outputs differ are
listed, so a learner can tell measured timings (expected to move) from checked values (which
must not).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 240.0


def execute(path: Path, keep: Path | None = None) -> tuple[float, list[str], int]:
    """Run one notebook from its own folder; return the seconds, each code cell's text output and
    the number of cells that raised.

    With ``keep``, the executed notebook is written there (same name) for reading its outputs.
    """
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError:  # kept and reported: the error output is in the notebook and the table
        pass
    seconds = time.perf_counter() - start
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, keep / path.name)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = sum(any(output.output_type == "error" for output in cell.get("outputs", [])) for cell in code)
    return seconds, [cell_text(cell) for cell in code], errors


def cell_text(cell) -> str:
    """Streams and text/plain results of one cell (images are left out: their bytes carry timings)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
        elif output.output_type == "error":
            parts.append(f"ERROR {output.ename}: {output.evalue}")
    return "".join(parts)


def changed_lines(first: str, second: str) -> list[str]:
    """The lines of two outputs that differ, marked - (run 1) and + (run 2)."""
    return [line for line in difflib.ndiff(first.splitlines(), second.splitlines()) if line[:1] in "-+"]


def differing_cells(first: list[str], second: list[str]) -> list[int]:
    return [index for index, (a, b) in enumerate(zip(first, second)) if a != b]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="notebook number prefixes, e.g. 02 04 (default: all)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each notebook (2 compares outputs)")
    parser.add_argument("--keep", type=Path, help="write the last run's executed notebooks into this folder")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [path for path in notebooks if path.name[:2] in args.only]
    print(f"profile={os.environ.get('COURSE_PROFILE', 'ci')}  load before: {os.getloadavg()}")
    rows, worst = [], 0.0
    for path in notebooks:
        times, outputs = [], []
        for _ in range(args.runs):
            seconds, texts, errors = execute(path, args.keep)
            times.append(seconds)
            outputs.append(texts)
            print(f"  {path.name}: {seconds:.0f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
        changed = differing_cells(outputs[0], outputs[1]) if args.runs > 1 else []
        worst = max(worst, *times)
        rows.append((path.name, times, changed, errors))
        for index in changed:
            print(f"    code cell {index}, lines that differ:")
            for line in changed_lines(outputs[0][index], outputs[1][index]):
                print(f"      {line[:160]}")
    print(f"\nload after: {os.getloadavg()}")
    print("| notebook | " + " | ".join(f"run {i + 1} (s)" for i in range(args.runs))
          + " | code cells whose output changed | errors |")
    print("|---|" + "---|" * args.runs + "---|---|")
    for name, times, changed, errors in rows:
        print(f"| {name} | " + " | ".join(f"{t:.0f}" for t in times) + f" | {changed or 'none'} | {errors} |")
    print(f"slowest: {worst:.0f} s against a budget of {BUDGET_S:.0f} s")
    return 0 if worst <= BUDGET_S and not any(row[3] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
