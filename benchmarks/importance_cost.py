"""Wall time and peak memory of every importance method on the embedded SmolLM2-135M.

    .venv/bin/python benchmarks/importance_cost.py                    # 64 x 256 calibration tokens
    .venv/bin/python benchmarks/importance_cost.py --samples 16 --tokens 128 --methods head:taylor layer:bi

Each method runs in a fresh subprocess (``--worker``), so one method's allocations cannot hide
another's. ``tracemalloc`` does not see torch's allocations, so memory is the process's resident
set: after the model and calibration data are loaded the worker resets the kernel's RSS high-water
mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` after the method
returns; "extra" is that peak minus the RSS just before the method started, i.e. what the method
itself needed. Where ``clear_refs`` is not writable a 5 ms psutil sampler thread is used instead.
The target is <= 60 s per method on 2 CPU cores. On a shared machine wall time depends on the
other jobs, so the table also gives the worker's CPU time and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {
    "head:magnitude": ("head_scores", {"method": "magnitude"}),
    "head:output_norm": ("head_scores", {"method": "output_norm"}),
    "head:mask_gradient": ("head_scores", {"method": "mask_gradient"}),
    "head:taylor": ("head_scores", {"method": "taylor"}),
    "neuron:magnitude": ("neuron_scores", {"method": "magnitude"}),
    "neuron:activation_frequency": ("neuron_scores", {"method": "activation_frequency"}),
    "neuron:wanda": ("neuron_scores", {"method": "wanda"}),
    "neuron:taylor": ("neuron_scores", {"method": "taylor"}),
    "layer:bi": ("block_influence", {}),
    "layer:bi_stored": ("block_influence_stored", {}),
    "layer:span4": ("span_distance", {"n": 4}),
}
TARGET_S = 60.0


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _hwm_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _rss_mb(), threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())


def worker(args) -> None:
    import torch

    from course_lib import importance
    from course_lib.zoo import load_decoder

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_decoder(args.model)
    calib = torch.load(args.calib_file)
    fn_name, kwargs = METHODS[args.worker]
    fn = getattr(importance, fn_name)
    call_args = (model,) if kwargs.get("method") == "magnitude" else (model, calib)
    import gc

    # from_pretrained memory-maps the safetensors file: weights become resident only when first
    # touched. Touch them all (and run one tiny forward for lazy initialisation) before measuring,
    # so that neither the paging-in nor its time is charged to the method.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        model(calib[:1, :8])
    gc.collect()
    before = _rss_mb()
    exact = _reset_hwm()
    sampler = None if exact else _Sampler()
    if sampler:
        sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    scores = fn(*call_args, **kwargs, batch_size=args.batch_size, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _hwm_mb() if exact else sampler.peak
    if sampler:
        sampler.stop.set()
    scores = scores if isinstance(scores, list) else [scores]
    print(json.dumps({"method": args.worker, "wall_s": wall, "cpu_s": cpu, "load_avg_1min": os.getloadavg()[0],
                      "rss_before_mb": before, "peak_mb": peak,
                      "extra_mb": peak - before, "exact_peak": exact,
                      "finite": all(bool(torch.isfinite(s).all()) for s in scores)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--calib-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from course_lib.data import calibration_batches
    from course_lib.zoo import load_decoder

    _, tokenizer = load_decoder(args.model)
    calib = calibration_batches(tokenizer, args.samples, args.tokens, seed=0)
    print(f"model {args.model}; calibration {args.samples} x {args.tokens} tokens; batch size {args.batch_size}; "
          f"torch threads {args.threads or torch.get_num_threads()}; cpu count {os.cpu_count()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.pt"
        torch.save(calib, calib_file)
        print(f"{'method':30s} {'wall s':>8s} {'CPU s':>8s} {'load':>5s} {'RSS before MB':>14s} {'peak MB':>9s} "
              f"{'extra MB':>9s}", flush=True)
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", method, "--calib-file", str(calib_file), "--model", args.model,
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(f"{method:30s} FAILED (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(lines[-1])
            results.append(r)
            flag = "" if r["wall_s"] <= TARGET_S else f"  (> {TARGET_S:.0f} s target)"
            print(f"{method:30s} {r['wall_s']:8.1f} {r.get('cpu_s', float('nan')):8.1f} "
                  f"{r.get('load_avg_1min', float('nan')):5.1f} {r['rss_before_mb']:14.0f} {r['peak_mb']:9.0f} "
                  f"{r['extra_mb']:9.0f}{flag}", flush=True)
    by_name = {r["method"]: r for r in results}
    if "layer:bi" in by_name and "layer:bi_stored" in by_name:
        s, h = by_name["layer:bi"], by_name["layer:bi_stored"]
        print(f"block influence extra memory: streaming {s['extra_mb']:.0f} MB vs output_hidden_states "
              f"{h['extra_mb']:.0f} MB ({h['extra_mb'] / max(s['extra_mb'], 1e-9):.1f}x)")
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "tokens": args.tokens,
                                         "batch_size": args.batch_size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
