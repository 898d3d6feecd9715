"""Held-out perplexity of the embedded SmolLM2-135M: fp32, round-to-nearest INT4, and AWQ INT4.

    .venv/bin/python benchmarks/awq_vs_rtn.py                  # about 12 min on 2 cores
    .venv/bin/python benchmarks/awq_vs_rtn.py --stock-quantizer  # autoawq's own search, CPU bug and all

Both INT4 variants use the same grid (asymmetric, group 64); AWQ calibrates on windows of the
Wikipedia calibration split (the ci profile's ``quant_calib_samples`` x ``calib_tokens``) and is
evaluated in memory through autoawq's CPU fallback. Perplexity: the ci profile's sliding window
over the first ``ppl_max_tokens`` tokens of the held-out test split.

``--stock-quantizer`` runs autoawq 0.2.9's ``AwqQuantizer`` unchanged, to reproduce the bug
``course_lib.awq_search`` repairs (on a CPU its block snapshot aliases the live weights, so
every layer is scaled twice).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import awq_search, data, quantize, zoo  # noqa: E402
from course_lib.evaluate import perplexity  # noqa: E402
from course_lib.profiles import get_profile  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--stock-quantizer", action="store_true", help="autoawq's AwqQuantizer, unpatched")
    args = parser.parse_args()
    profile = get_profile("ci")
    model, tokenizer = zoo.load_decoder()
    ids = tokenizer(data.prose_text("test"), return_tensors="pt", verbose=False).input_ids[0]
    ids = ids[:profile.ppl_max_tokens or None]
    calib = data.calibration_batches(tokenizer, profile.quant_calib_samples, profile.calib_tokens)

    def ppl(m):
        return perplexity(m, ids, context=profile.ppl_context, stride=profile.ppl_stride)

    rows = [("fp32", ppl(model), 0.0)]
    start = time.perf_counter()
    rtn = quantize.rtn_int4(copy.deepcopy(model), group_size=args.group_size)
    rows.append((f"RTN INT4 g{args.group_size}", ppl(rtn), time.perf_counter() - start))
    del rtn
    if args.stock_quantizer:
        from awq.quantize.quantizer import AwqQuantizer

        awq_search.quantizer_cls = lambda: AwqQuantizer
    start = time.perf_counter()
    quantize.awq_int4(model, calib, group_size=args.group_size)
    label = "AWQ INT4 (stock autoawq search)" if args.stock_quantizer else "AWQ INT4"
    rows.append((f"{label} g{args.group_size}", ppl(model), time.perf_counter() - start))
    print(f"\n{len(ids)} held-out tokens, window {profile.ppl_context} / stride {profile.ppl_stride}; "
          f"AWQ calibrated on {calib.shape[0]} x {calib.shape[1]} tokens")
    print("| model | perplexity | quantization time (s) |\n|---|---|---|")
    for name, value, seconds in rows:
        print(f"| {name} | {value:.2f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
