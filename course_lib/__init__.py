"""Companion package of the structured-pruning course.

The pipeline it mirrors: model + calibration data -> importance scores -> PruningPlan -> surgery
-> evaluate / recover / quantize / save. Import the pieces from their modules
(``course_lib.zoo``, ``course_lib.data``, ``course_lib.surgery`` ...); this file stays light so
that ``import course_lib`` never loads torch before it is needed.
"""

__version__ = "0.1.0"
