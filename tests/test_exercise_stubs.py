"""Every exercise of every course notebook: the solution passes its check, the learner's stub does not.

nbval runs the solved notebooks, so it proves each solution passes in context, but only in a full
run, and it never sees the learners' copies. Here each fenced exercise cell is taken from the
notebook as it is committed, executed twice (solved, and as ``strip_solutions`` writes it for
learners) after the notebook's own import statements, and the check that the notebook calls on it
runs on tiny random models in place of the embedded ones: a second or two for all of them but
the capstone, which is defined on the real SmolLM2 (about 20 s).

The table ``CHECKS`` says, per exercise function, which check the notebook calls and how to call
it cheaply. A new exercise without an entry, or an entry whose exercise is gone, fails the
coverage test, so the table cannot silently fall behind the notebooks.
"""

from __future__ import annotations

import ast
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")

import nbformat
import pytest
import torch

from course_lib.exercises import CheckFailed
from course_lib.exercises.hardware import check_attention_params_per_head, check_mlp_flops, check_round_down
from course_lib.exercises.heads import (check_head_magnitudes, check_head_selection, check_head_surgery,
                                        check_heads_parameters)
from course_lib.exercises.iterative import check_split
from course_lib.exercises.layers import check_block_influence_hooks, check_token_distance
from course_lib.exercises.learner import BEGIN, strip_solutions, write_learner_copies
from course_lib.exercises.neurons import check_down_refit, check_gated_neuron_parameters, check_wanda_scores
from course_lib.exercises.quantize import check_rtn_int4
from course_lib.exercises.recovery import check_distillation_loss
from course_lib.plan import PruningPlan
from course_lib.surgery import apply_plan
from tiny import calib, tiny_bert, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _heads_parameters(fn):
    model = tiny_bert()
    return check_heads_parameters(fn, model, PruningPlan(heads={0: [1], 1: [0, 2, 3]}))


def _head_selection(fn):
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))  # tiny_bert: 2 layers of 4 heads
    return check_head_selection(fn, tiny_bert(), scores, 2, protect_first=1, protect_last=0)


def _gated_neuron_parameters(fn):
    model, plan = tiny_llama(), PruningPlan(neurons={0: [1, 2, 3], 2: list(range(10))})
    return check_gated_neuron_parameters(fn, model, plan, pruned=apply_plan(copy.deepcopy(model), plan))


def _capstone_on_disk(fn):
    """The capstone's cheap half: what ``build_capstone`` saved loads and has the target's shape. The
    notebook's ``check_capstone`` adds the minutes of perplexity and timing. (The one entry here that
    loads the real SmolLM2: the capstone is defined on it.)"""
    import tempfile

    from course_lib.budget import block_parameters
    from course_lib.exercises.capstone import Target, architecture, load_candidate, unaligned_widths
    from course_lib.profiles import get_profile
    from course_lib.zoo import load_decoder

    with tempfile.TemporaryDirectory() as directory:
        fn(Path(directory), get_profile("ci"))
        shape, target = architecture(directory), Target()
        removed = 1 - block_parameters(shape) / block_parameters(load_decoder(get_profile("ci").decoder)[0])
        if removed < target.removed_share - 1e-9 or unaligned_widths(shape, target.multiple):
            raise CheckFailed(f"the saved model removes {removed:.1%} of the decoder-layer parameters, widths "
                              f"unaligned: {unaligned_widths(shape, target.multiple)}")
        load_candidate(directory)


def _attention_params_per_head(fn):
    model = tiny_llama()  # the notebook asks it of SmolLM2's config: a Llama, GQA, no attention bias
    return check_attention_params_per_head(model, *fn(model.config))


# exercise function -> (the check the notebook calls, that check on tiny inputs)
CHECKS: dict[str, tuple[str, Callable[[Callable], object]]] = {
    "attention_params_per_head": ("check_attention_params_per_head", _attention_params_per_head),
    "mlp_flops": ("check_mlp_flops", check_mlp_flops),
    "round_down": ("check_round_down", check_round_down),
    "head_magnitudes": ("check_head_magnitudes", lambda fn: check_head_magnitudes(fn, tiny_bert())),
    "heads_parameters": ("check_heads_parameters", _heads_parameters),
    "select_lowest_heads": ("check_head_selection", _head_selection),
    "remove_heads": ("check_head_surgery", lambda fn: check_head_surgery(fn, tiny_bert(), 1, [0, 2])),
    "token_block_influence": ("check_token_distance",
                              lambda fn: check_token_distance(fn, tiny_llama(), calib(n=3), layers=(0, 2),
                                                              lengths=(16, 9, 4))),
    "angular_block_influence": ("check_block_influence_hooks",
                                lambda fn: check_block_influence_hooks(fn, tiny_llama(), calib(n=3), lengths=(16, 9, 4))),
    "gated_neuron_parameters": ("check_gated_neuron_parameters", _gated_neuron_parameters),
    "wanda": ("check_wanda_scores", lambda fn: check_wanda_scores(fn, tiny_llama(), calib(n=2), layers=(0, -1))),
    "refit_down": ("check_down_refit", lambda fn: check_down_refit(fn, tiny_llama(), calib(n=6), layer=1)),
    "distillation_loss": ("check_distillation_loss", check_distillation_loss),
    "my_split": ("check_split", check_split),
    "rtn_int4": ("check_rtn_int4", check_rtn_int4),
    "build_capstone": ("check_capstone", _capstone_on_disk),
}


@dataclass
class Exercise:
    notebook: str
    function: str
    source: str  # the solved cell, as committed
    imports: str  # every top-level import statement of the notebook's code cells before it
    after: str  # the code cells after it, where the notebook calls the check

    def define(self, source: str) -> Callable:
        """Run the notebook's imports and ``source`` in a fresh namespace; return the exercise function."""
        namespace: dict = {}
        exec(compile(self.imports, f"{self.notebook}:imports", "exec"), namespace)
        exec(compile(source, f"{self.notebook}:{self.function}", "exec"), namespace)
        return namespace[self.function]


def _imports(sources: list[str]) -> str:
    nodes = [node for source in sources for node in ast.parse(source).body
             if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(ast.unparse(node) for node in nodes)


def exercises() -> list[Exercise]:
    found = []
    for path in NOTEBOOKS:
        sources = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        for i, source in enumerate(sources):
            if BEGIN not in source:
                continue
            functions = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
            assert len(functions) == 1, f"{path.name}: an exercise cell defines one function, this one {functions}"
            found.append(Exercise(path.name, functions[0], source, _imports(sources[:i]), "\n".join(sources[i + 1:])))
    return found


EXERCISES = exercises()


def test_every_exercise_has_a_check_and_every_check_an_exercise():
    assert NOTEBOOKS, "no course notebooks found"
    names = [e.function for e in EXERCISES]
    assert len(names) == len(set(names)), f"exercise functions defined twice: {names}"
    assert sorted(names) == sorted(CHECKS)


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: f"{e.notebook[:2]}-{e.function}")
def test_solution_passes_and_stub_fails_the_notebooks_check(exercise):
    check_name, run_check = CHECKS[exercise.function]
    assert f"{check_name}(" in exercise.after, f"{exercise.notebook} no longer calls {check_name} after the exercise"

    run_check(exercise.define(exercise.source))  # raises CheckFailed if the committed solution is wrong

    stub = strip_solutions(exercise.source)
    assert "raise NotImplementedError" in stub and "# YOUR CODE HERE" in stub
    with pytest.raises(NotImplementedError):
        run_check(exercise.define(stub))


def test_a_wrong_solution_fails_with_checkfailed_not_an_error():
    """The other side of the test above: the checks judge answers; a wrong one is named, not crashed on."""
    with pytest.raises(CheckFailed):
        CHECKS["round_down"][1](lambda width, multiple: width // multiple * multiple)  # no floor at one tile


def test_learner_copies_of_the_course_compile_and_hold_no_solution(tmp_path):
    written = write_learner_copies(ROOT / "notebooks", tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    stubs = 0
    for path in written:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            assert "SOLUTION" not in cell.source and not cell.outputs
            ast.parse(cell.source, filename=path.name)  # a stub with broken indentation fails here
            stubs += cell.source.count("raise NotImplementedError")
    assert stubs == len(EXERCISES)
