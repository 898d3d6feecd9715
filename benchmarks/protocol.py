"""The decoder quality protocol shared by the quality benchmarks (``shared/reference/quality-anchors.md``).

Held-out perplexity: the first 64 x 512 + 1 tokens of the test split (articles disjoint from the
calibration split), disjoint 512-token windows, no BOS. Calibration: 32 windows of 256 tokens of
the calibration split, seed 0.
"""

from __future__ import annotations

import torch

from course_lib import data
from course_lib.evaluate import perplexity

WINDOWS, CONTEXT = 64, 512


def held_out_ids(tokenizer) -> torch.Tensor:
    return tokenizer(data.prose_text("test"), return_tensors="pt", verbose=False).input_ids[0][: WINDOWS * CONTEXT + 1]


def calibration(tokenizer) -> torch.Tensor:
    return data.calibration_batches(tokenizer, 32, 256, seed=0)


def ppl(model, ids: torch.Tensor) -> float:
    return perplexity(model, ids, context=CONTEXT, stride=CONTEXT)
