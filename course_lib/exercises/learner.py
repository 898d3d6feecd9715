"""``python -m course_lib.exercises.learner SRC_DIR DEST_DIR``: write the learners' notebooks.

Every code cell's lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` are replaced by a stub
that raises ``NotImplementedError``; outputs are cleared. The solved notebooks stay the single
source of truth (CI runs them), so the two copies never drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

from ..errors import SettingError

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"


def strip_solutions(source: str) -> str:
    """The cell source with each fenced solution replaced by an indented stub."""
    out, inside = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise SettingError(f"nested {BEGIN!r}")
            inside = True
            indent = re.match(r"\s*", line).group(0)
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f"{indent}raise NotImplementedError")
        elif stripped == END:
            if not inside:
                raise SettingError(f"{END!r} without {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise SettingError(f"{BEGIN!r} without {END!r}")
    return "\n".join(out)


def write_learner_copies(src: Path, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(src.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.source = strip_solutions(cell.source)
                cell.outputs, cell.execution_count = [], None
        target = dest / path.name
        nbformat.write(notebook, target)
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m course_lib.exercises.learner SRC_DIR DEST_DIR")
    for path in write_learner_copies(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
