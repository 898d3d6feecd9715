"""Companion package of the structured-pruning course.

The pipeline it mirrors: model + calibration data -> importance scores -> PruningPlan -> surgery
-> evaluate / recover / quantize / save. Import the pieces from their modules
(``course_lib.zoo``, ``course_lib.data``, ``course_lib.surgery`` ...); this file stays light so
that ``import course_lib`` never loads torch before it is needed.
"""

import logging

__version__ = "0.1.0"

# Two import-time warnings of the pinned stack that say nothing about the user's work: torchao 0.18
# tries to load its CUDA / cp310 extensions ("Failed to load ..._C_mxfp8...so") and registers enums
# the way torch 2.13 deprecates. Its CPU paths, which benchmarks/speed.py compares with
# course_lib.lowbit, work without them. Silenced by logger name, before anything imports torchao.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
