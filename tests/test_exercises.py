"""The learners' copies: solutions fenced out, everything else kept."""

import nbformat
import pytest

from course_lib.exercises import CheckFailed, check
from course_lib.exercises.learner import strip_solutions, write_learner_copies


def test_strip_solutions_keeps_the_indentation_and_the_rest():
    source = "def f(x):\n    # BEGIN SOLUTION\n    return x + 1\n    # END SOLUTION\n\ncheck_f(f)"
    assert strip_solutions(source) == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError\n\ncheck_f(f)"


@pytest.mark.parametrize("source", ["# BEGIN SOLUTION\nx = 1", "x = 1\n# END SOLUTION",
                                    "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"])
def test_unbalanced_fences_are_errors(source):
    with pytest.raises(ValueError, match="SOLUTION"):
        strip_solutions(source)


def test_learner_copies_have_no_solutions_and_no_outputs(tmp_path):
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("answer = None\n# BEGIN SOLUTION\nanswer = 42\n# END SOLUTION")
    cell.outputs = [nbformat.v4.new_output("stream", text="42")]
    notebook.cells = [nbformat.v4.new_markdown_cell("# Title"), cell]
    (tmp_path / "src").mkdir()
    nbformat.write(notebook, tmp_path / "src" / "01_x.ipynb")
    [written] = write_learner_copies(tmp_path / "src", tmp_path / "learner")
    copy = nbformat.read(written, as_version=4)
    assert copy.cells[0].source == "# Title"
    assert "42" not in copy.cells[1].source and "raise NotImplementedError" in copy.cells[1].source
    assert copy.cells[1].outputs == []


def test_check_raises_with_the_message():
    check(True, "unused")
    with pytest.raises(CheckFailed, match="shape is wrong"):
        check(False, "shape is wrong")
