"""The first cell of every notebook: seeds, profile and threads in one call.

    from course_lib.notebook import setup
    profile = setup()

The profile (``ci`` by default, ``full`` via ``COURSE_PROFILE``) changes sizes, never code paths.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .profiles import Profile, get_profile


def setup(seed: int = 0, profile: str | None = None) -> Profile:
    """Seed every generator, pick the profile, and keep torch deterministic where it is cheap."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = get_profile(profile)
    print(f"profile={chosen.name}  device={chosen.torch_device()}  torch threads={torch.get_num_threads()}  seed={seed}")
    return chosen
