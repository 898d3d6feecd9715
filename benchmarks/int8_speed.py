"""Is torchao's int8 (dynamic activations, int8 weights) faster than fp32 on this CPU, and where?

    .venv/bin/python benchmarks/int8_speed.py
    .venv/bin/python benchmarks/int8_speed.py --shapes 1x1 1x128 8x128 32x128 --repeats 7

The embedded SmolLM2-135M, dense, one forward pass per call, at several batch x sequence shapes.
fp32 and int8 run in alternation (fp32, int8, fp32, int8, ...) for each shape, so the machine's
load changes both alike. Each cell is the median of ``--repeats`` calls after warm-up; the ratio is
fp32 time / int8 time (above 1: int8 is faster).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib import zoo  # noqa: E402
from course_lib.evaluate import latency  # noqa: E402
from course_lib.quantize import int8_dynamic  # noqa: E402


def shape(text: str) -> tuple[int, int]:
    batch, seq = text.lower().split("x")
    return int(batch), int(seq)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=shape, default=[(1, 1), (1, 128), (8, 128), (32, 128)],
                        help="batch x sequence, e.g. 8x128")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, _ = zoo.load_decoder()
    quantized = int8_dynamic(copy.deepcopy(model))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} calls")
    print("| batch x seq | fp32 ms | int8 ms | fp32 / int8 |\n|---|---|---|---|")
    for batch, seq in args.shapes:
        times = {"fp32": [], "int8": []}
        for _ in range(2):  # two alternating rounds; the better median of each is kept
            for name, m in (("fp32", model), ("int8", quantized)):
                times[name].append(latency(m, batch=batch, seq=seq, repeats=args.repeats)["median_ms"])
        fp32, int8 = min(times["fp32"]), min(times["int8"])
        print(f"| {batch} x {seq} | {fp32:.1f} | {int8:.1f} | {fp32 / int8:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
