"""Exercise checks, one module per notebook topic, in the style of the MIT efficient-ML labs.

A notebook poses an exercise as a fenced stub; the solved version (what CI runs) keeps the code
between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` lines, and :mod:`course_lib.exercises.learner`
writes the learner's copy with each fence replaced by ``raise NotImplementedError``. After the
stub, a ``check_*`` call compares the learner's answer with an independent computation and says
what is wrong, not only that something is.
"""


class CheckFailed(AssertionError):
    """An exercise answer is wrong; the message says how."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
