"""Time and peak memory of scoring + planning + reconstruction of SmolLM2 in a profile (default ci).

    .venv/bin/python benchmarks/planner_cost.py                # 20% of the block parameters
    .venv/bin/python benchmarks/planner_cost.py --fraction 0.3

Runs what ``python -m course_lib run --param-fraction F`` runs before recovery: the sensitivity
pass (``budget.sensitivity``), the plan (``budget.plan_for_budget``) and the sequential refit with
surgery (``reconstruction.prune_and_reconstruct``), on the profile's planning calibration
(``plan_samples x plan_tokens`` windows of the calibration split). Peak memory is the process's
maximum resident set size, so it includes the model (538 MB of fp32 weights) and torch itself;
the line before the work shows what was resident before it started.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib.budget import plan_for_budget, sensitivity  # noqa: E402
from course_lib.profiles import get_profile  # noqa: E402
from course_lib.reconstruction import prune_and_reconstruct  # noqa: E402
from course_lib.tasks import task_for  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args()
    profile = get_profile(args.profile)
    task = task_for(profile.decoder, profile)
    model = task.load()
    calib = task.planning_calibration()
    print(f"profile {profile.name}: calibration {tuple(calib.shape)}, {torch.get_num_threads()} threads; "
          f"peak RSS before the work {rss_mb():.0f} MB", flush=True)
    times = {}
    start = time.perf_counter()
    sens = sensitivity(model, calib, progress=False)
    times["sensitivity (scores of every option)"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = plan_for_budget(model, fraction=args.fraction, sens=sens)
    times["plan (dynamic programme)"] = time.perf_counter() - start
    start = time.perf_counter()
    prune_and_reconstruct(model, plan, calib, progress=False)
    times["reconstruction + surgery"] = time.perf_counter() - start
    for name, seconds in times.items():
        print(f"{name:<40} {seconds:6.1f} s")
    print(f"{'total':<40} {sum(times.values()):6.1f} s")
    print(f"peak RSS {rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
