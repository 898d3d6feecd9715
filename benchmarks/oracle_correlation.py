"""How well do the cheap scores rank what actually matters? Spearman against removal oracles.

    .venv/bin/python benchmarks/oracle_correlation.py                     # defaults below
    .venv/bin/python benchmarks/oracle_correlation.py --heads 0           # layers only

On the embedded SmolLM2-135M:

* **layers**: block influence (``1 - cos`` and angular) from calibration prose, against
  :func:`layer_removal_oracle` -- the held-out perplexity increase when each layer alone is
  removed by real surgery. A removable layer has low influence *and* a small increase, so a good
  score correlates positively.
* **heads** (``--heads K`` sampled query heads, seeded): every head criterion, against the
  held-out perplexity increase when that head's context is zeroed (a forward pre-hook on
  ``o_proj`` zeroing its slice: exactly what removing the head does to the block's output; single
  heads of a GQA group cannot be removed by surgery without unbalancing the group).

Held-out text is the ``test`` split of :func:`course_lib.data.load_prose` (articles never seen in
calibration), cut into ``--eval-samples`` evenly spaced windows of ``--eval-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from course_lib.data import calibration_batches, load_prose  # noqa: E402
from course_lib.importance import (  # noqa: E402
    HEAD_METHODS,
    block_influence,
    head_scores,
    layer_removal_oracle,
    rank_correlation,
)
from course_lib.importance.layers import _perplexity  # noqa: E402
from course_lib.importance._calibration import make_batches  # noqa: E402
from course_lib.pruned_modeling import adapter_for  # noqa: E402
from course_lib.zoo import load_decoder  # noqa: E402


def heldout_windows(tokenizer, n: int, t: int) -> torch.Tensor:
    text = (tokenizer.eos_token or "\n\n").join(load_prose()["test"]["text"])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if ids.numel() < n * t:
        raise SystemExit(f"the held-out split has {ids.numel()} tokens, fewer than {n} x {t}")
    step = (ids.numel() - t) // max(n - 1, 1)
    return torch.stack([ids[i * step : i * step + t] for i in range(n)])


def head_oracle(model, heldout, heads, batch_size, log) -> list[float]:
    """Held-out perplexity increase when each (layer, head)'s context slice is zeroed."""
    adapter = adapter_for(model)
    d = adapter.head_dim(model)
    batches = make_batches(heldout, batch_size)
    with torch.no_grad():
        base = _perplexity(model, batches)
        out = []
        for i, (layer, head) in enumerate(heads):
            def zero_head(module, args, lo=head * d, hi=(head + 1) * d):
                x = args[0].clone()
                x[..., lo:hi] = 0
                return (x,) + tuple(args[1:])

            handle = adapter.o_proj(adapter.blocks(model)[layer]).register_forward_pre_hook(zero_head)
            try:
                out.append(_perplexity(model, batches) - base)
            finally:
                handle.remove()
            log(f"  head oracle {i + 1}/{len(heads)}: layer {layer} head {head}: +{out[-1]:.4f} ppl")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-tokens", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=27, help="sampled heads for the head oracle (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write all scores and correlations here")
    args = parser.parse_args()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    model, tokenizer = load_decoder(args.model)
    calib = calibration_batches(tokenizer, args.calib_samples, args.calib_tokens, seed=args.seed)
    heldout = heldout_windows(tokenizer, args.eval_samples, args.eval_tokens)
    log(f"calibration {tuple(calib.shape)}, held-out {tuple(heldout.shape)}")
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    bi = block_influence(model, calib, batch_size=args.batch_size)
    angular = block_influence(model, calib, metric="angular", batch_size=args.batch_size)
    log("block influence done; removing each layer in turn (the oracle)")
    oracle = layer_removal_oracle(model, heldout, "perplexity", batch_size=args.batch_size)
    base_ppl = _perplexity(model, make_batches(heldout, args.batch_size))
    layer_rho = {"block_influence (1 - cos)": rank_correlation(bi, oracle),
                 "block_influence (angular)": rank_correlation(angular, oracle)}
    log(f"held-out perplexity of the full model: {base_ppl:.2f}")
    print(f"{'layer':>5s} {'BI':>9s} {'angular':>9s} {'ppl increase':>13s}")
    for layer in range(len(bi)):
        print(f"{layer:5d} {bi[layer]:9.4f} {angular[layer]:9.4f} {oracle[layer]:13.3f}")
    for name, rho in layer_rho.items():
        print(f"Spearman({name}, remove-one-layer oracle) = {rho:+.3f}")
    ranked_bi, ranked_oracle = torch.argsort(bi).tolist(), torch.argsort(oracle).tolist()
    print(f"5 lowest-BI layers {ranked_bi[:5]}; 5 cheapest layers to remove (oracle) {ranked_oracle[:5]}")
    report.update(base_ppl=base_ppl, bi=bi.tolist(), angular=angular.tolist(), layer_oracle=oracle.tolist(),
                  layer_spearman=layer_rho)

    if args.heads > 0:
        adapter = adapter_for(model)
        blocks = adapter.blocks(model)
        all_heads = [(l, h) for l, b in enumerate(blocks) for h in range(adapter.num_heads(b))]
        g = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(all_heads), generator=g)[: args.heads].tolist()
        heads = sorted(all_heads[i] for i in pick)
        scores = {}
        for method in HEAD_METHODS:
            scores[method] = head_scores(model, calib, method, batch_size=args.batch_size)
            log(f"head {method} done")
        truth = head_oracle(model, heldout, heads, args.batch_size, log)
        head_rho = {m: rank_correlation([float(s[l, h]) for l, h in heads], truth) for m, s in scores.items()}
        for method, rho in head_rho.items():
            print(f"Spearman(head {method}, zero-one-head oracle on {len(heads)} heads) = {rho:+.3f}")
        report.update(heads=heads, head_oracle=truth, head_spearman=head_rho,
                      head_scores={m: s.tolist() for m, s in scores.items()})
    log("done")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=lambda x: None if math.isnan(x) else x))


if __name__ == "__main__":
    main()
