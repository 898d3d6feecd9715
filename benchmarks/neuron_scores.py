"""Which neuron score pays off once the consumer is refitted? Held-out perplexity is the referee.

    .venv/bin/python benchmarks/neuron_scores.py            # about 20 min on 2 cores
    .venv/bin/python benchmarks/neuron_scores.py --methods wanda obs

Every score removes the same thing: its 384 lowest neurons (25%, keeping 1,152, a multiple of 64)
in each of SmolLM2's layers 1-28 (layers 0 and 29 stay whole), ranked *within* the layer, so no
score is judged by how badly it compares layers. Each plan is measured as plain surgery and with
reconstruction (``reconstruction.prune_and_reconstruct``). Protocol of ``benchmarks/quality.py``:
calibration 32 x 256 tokens of the calibration split, perplexity on 64 x 512 held-out tokens.
The removal oracle per neuron (30 x 1,536 forward passes) is out of reach on a CPU; the
perplexity after removing a quarter of every layer is the oracle for the set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402
import torch  # noqa: E402

from course_lib import importance, zoo  # noqa: E402
from course_lib.plan import PruningPlan  # noqa: E402
from course_lib.reconstruction import prune_and_reconstruct  # noqa: E402
from course_lib.surgery import apply_plan  # noqa: E402

REMOVE, FIRST, LAST = 384, 1, 28


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["wanda", "fluctuation", "obs", "taylor", "magnitude"])
    parser.add_argument("--json", default="reports/neuron_scores.json")
    args = parser.parse_args()
    model, tok = zoo.load_decoder()
    ids, calib = protocol.held_out_ids(tok), protocol.calibration(tok)

    def ppl(m):
        return protocol.ppl(m, ids)

    dense = ppl(model)
    print(f"dense perplexity {dense:.2f}", flush=True)
    rows = []
    for method in args.methods:
        start = time.perf_counter()
        scores = importance.neuron_scores(model, calib, method, progress=False)
        seconds = time.perf_counter() - start
        plan = PruningPlan(neurons={i: torch.argsort(scores[i])[:REMOVE].tolist() for i in range(FIRST, LAST + 1)})
        plain = ppl(apply_plan(copy.deepcopy(model), plan))
        refitted = copy.deepcopy(model)
        prune_and_reconstruct(refitted, plan, calib, progress=False)
        rebuilt = ppl(refitted)
        rows.append({"method": method, "score_seconds": seconds, "perplexity": plain, "reconstructed": rebuilt})
        print(f"{method:<12} score {seconds:5.0f} s   surgery only {plain:9.2f} ({plain / dense:5.2f}x)   "
              f"+ reconstruction {rebuilt:7.2f} ({rebuilt / dense:4.2f}x)", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dense": dense, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
