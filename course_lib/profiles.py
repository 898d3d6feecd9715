"""Run profiles: one setting, read in one place, that changes sizes but never code paths.

``ci`` keeps every step small enough for 2 CPU cores and the embedded offline models; ``full`` is
for a learner online with a GPU (hub models, long contexts). Choose with the environment variable
``COURSE_PROFILE`` or by passing a name to :func:`get_profile`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SettingError


@dataclass(frozen=True)
class Profile:
    name: str
    decoder: str  # a zoo name or a hub id
    encoder: str
    calib_samples: int  # calibration sequences
    calib_tokens: int  # tokens per calibration sequence
    ppl_context: int  # sliding-window perplexity context
    ppl_stride: int
    ppl_max_tokens: int  # cap on held-out tokens scored (0 = all)
    eval_examples: int  # sentiment test examples scored (0 = all)
    train_examples: int  # sentiment train examples for the fine-tuned baseline (0 = all)
    quant_calib_samples: int  # calibration sequences for AWQ's scale and clipping search
    plan_samples: int  # sequences (encoder: 8 x as many examples) for the budget planner and reconstruction
    plan_tokens: int  # tokens per planner sequence (decoder)
    recovery_tokens: int  # decoder recovery budget: training tokens (packed sequences)
    recovery_seq: int  # decoder recovery sequence length
    recovery_batch: int  # decoder recovery sequences per optimizer step
    validation_windows: int  # decoder recovery: validation-split windows of recovery_seq tokens
    encoder_recovery_tokens: int  # encoder recovery budget: real (unpadded) training tokens
    device: str

    def torch_device(self) -> str:
        """The profile's device if this machine has it, else the CPU (same code path either way)."""
        import torch

        return self.device if self.device != "cuda" or torch.cuda.is_available() else "cpu"


# Sized to the measured throughput of the default recipe on 2 CPU cores, so that recovery takes
# about 10 minutes there (benchmarks/recovery_recipes.py; numbers in the issue notes).
RECOVERY_TOKENS_CI = 98_304

PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        decoder="smollm2-135m",
        encoder="minilm-l6",
        calib_samples=16,
        calib_tokens=128,
        ppl_context=256,
        ppl_stride=192,
        ppl_max_tokens=2048,
        eval_examples=512,
        train_examples=2048,
        quant_calib_samples=8,
        plan_samples=32,
        plan_tokens=256,
        recovery_tokens=RECOVERY_TOKENS_CI,
        recovery_seq=512,
        recovery_batch=4,
        validation_windows=16,
        encoder_recovery_tokens=131_072,
        device="cpu",
    ),
    "full": Profile(
        name="full",
        decoder="smollm2-135m",
        encoder="minilm-l6",
        calib_samples=128,
        calib_tokens=512,
        ppl_context=2048,
        ppl_stride=512,
        ppl_max_tokens=0,
        eval_examples=0,
        train_examples=0,
        quant_calib_samples=128,
        plan_samples=128,
        plan_tokens=512,
        recovery_tokens=20_000_000,
        recovery_seq=2048,
        recovery_batch=32,
        validation_windows=64,
        encoder_recovery_tokens=1_000_000,
        device="cuda",
    ),
}

ENV_VAR = "COURSE_PROFILE"


def get_profile(name: str | None = None) -> Profile:
    """Return the named profile, else the one in ``$COURSE_PROFILE``, else ``ci``."""
    name = name if name is not None else os.environ.get(ENV_VAR, "ci")
    if name not in PROFILES:
        raise SettingError(f"profile={name!r} is unknown; choose one of {sorted(PROFILES)}", setting="profile")
    return PROFILES[name]
