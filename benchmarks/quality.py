"""Quality after pruning, no recovery: depth baselines, the old explicit path and the budget planner.

    .venv/bin/python benchmarks/quality.py                 # decoder and encoder, about 25 min on 2 cores
    .venv/bin/python benchmarks/quality.py --only decoder  # or encoder
    .venv/bin/python benchmarks/quality.py --json reports/quality.json

Protocol (``shared/reference/quality-anchors.md``), everything in one process:

* SmolLM2-135M: perplexity on the held-out Wikipedia split, the first 64 x 512 + 1 tokens in
  disjoint 512-token windows, no BOS; calibration ``data.calibration_batches(tok, 32, 256, seed=0)``
  from the calibration split (disjoint articles). Budgets are shares of the decoder-layer
  parameters (embeddings and LM head not counted).
* MiniLM sentiment classifier (the ci profile's fine-tuned baseline): accuracy on the whole test
  split (1,057 snippets); calibration 256 examples of the train split.

Rows: dense; the pipeline's explicit path at 26.7% of the neurons, as it was (one global ranking of
raw Wanda scores) and as it is now (scores over their layer's median, then reconstruction);
ShortGPT (the n lowest block-influence layers, protect 2 + 2); Gromov et al. (the best n-block span
by angular distance); the planner (``budget.plan_for_budget``) with and without reconstruction.
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

from course_lib import data, importance, selection, sentiment, zoo  # noqa: E402
from course_lib.budget import block_parameters, plan_for_budget, sensitivity  # noqa: E402
from course_lib.reconstruction import prune_and_reconstruct  # noqa: E402
from course_lib.surgery import apply_plan, parameters_removed  # noqa: E402


def _row(name: str, model, plan, quality: float, dense: float, block_params: int, seconds: float, higher: bool):
    removed = parameters_removed(model, plan) if plan is not None else 0
    ratio = dense / quality if higher else quality / dense
    row = {"variant": name, "removed_fraction": removed / block_params, "quality": quality,
           "ratio_to_dense": ratio, "seconds": seconds}
    print(f"{name:<52} removed {removed / block_params:6.1%}  quality {quality:10.4g}  "
          f"{'of dense' if higher else 'x dense'} {quality / dense if higher else ratio:6.3f}  ({seconds:.0f} s)",
          flush=True)
    return row


def _variants(model, calib, budget_layers: int, fraction: float, sens, protect: dict):
    """(name, plan builder, reconstruct?) for one budget."""
    def shortgpt():
        return selection.select_layers(model, importance.block_influence(model, calib, progress=False),
                                       count=budget_layers, protect_first=2, protect_last=2)

    def gromov():
        start, _ = importance.best_span(importance.span_distance(model, calib, budget_layers, progress=False))
        return selection.select_span(start, budget_layers, model=model)

    def planner():
        return plan_for_budget(model, fraction=fraction, sens=sens, **protect)

    return [(f"ShortGPT: {budget_layers} layers by block influence", shortgpt, False),
            (f"Gromov: best {budget_layers}-block span", gromov, False),
            (f"planner {fraction:.0%}, no reconstruction", planner, False),
            (f"planner {fraction:.0%} + reconstruction", planner, True)]


def decoder(results: list) -> None:
    model, tok = zoo.load_decoder()
    ids, calib = protocol.held_out_ids(tok), protocol.calibration(tok)

    def ppl(m):
        return protocol.ppl(m, ids)

    block_params = block_parameters(model)
    dense = ppl(model)
    results.append(_row("SmolLM2 dense", model, None, dense, dense, block_params, 0, False))
    start = time.perf_counter()
    sens = sensitivity(model, calib, progress=False)
    print(f"sensitivity pass: {time.perf_counter() - start:.0f} s", flush=True)
    # the explicit path at 26.7% of the neurons (= 20% of block parameters), protect 1 + 1 as the pipeline:
    # before (one global ranking of raw Wanda scores, no refit) and now (layer-normalised, refitted)
    start = time.perf_counter()
    wanda = importance.neuron_scores(model, calib, "wanda", progress=False)
    old = selection.select_neurons(model, wanda, count=12_288, protect_first=1, protect_last=1)
    pruned = apply_plan(copy.deepcopy(model), old)
    results.append(_row("SmolLM2 old explicit path: raw Wanda, global", model, old, ppl(pruned), dense,
                        block_params, time.perf_counter() - start, False))
    start = time.perf_counter()
    new = selection.select_neurons(model, selection.layer_normalised(wanda), count=12_288, protect_first=1,
                                   protect_last=1)
    pruned = copy.deepcopy(model)
    prune_and_reconstruct(pruned, new, calib, progress=False)
    results.append(_row("SmolLM2 explicit path now: Wanda / layer median + reconstruction", model, new, ppl(pruned),
                        dense, block_params, time.perf_counter() - start, False))
    for n_layers, fraction in ((6, 0.2), (9, 0.3)):
        for name, build, rebuild in _variants(model, calib, n_layers, fraction, sens, {}):
            start = time.perf_counter()
            plan = build()
            pruned = copy.deepcopy(model)
            if rebuild:
                prune_and_reconstruct(pruned, plan, calib, progress=False)
            else:
                apply_plan(pruned, plan)
            seconds = time.perf_counter() - start
            results.append(_row(f"SmolLM2 {name}", model, plan, ppl(pruned), dense, block_params, seconds, False))
            if rebuild:
                results[-1]["plan"] = plan.to_dict()


def encoder(results: list) -> None:
    model, tok, _ = sentiment.load_baseline("ci")
    train = data.load_sentiment()["train"].shuffle(seed=0).select(range(256))
    batch = tok(list(train["text"]), padding=True, truncation=True, max_length=sentiment.MAX_LENGTH,
                return_tensors="pt")
    calib = [{k: v[i:i + 8] for k, v in batch.items()} for i in range(0, 256, 8)]

    def acc(m):
        return sentiment.sentiment_accuracy(m, tok, limit=0)

    block_params = block_parameters(model)
    dense = acc(model)
    results.append(_row("MiniLM dense", model, None, dense, dense, block_params, 0, True))
    sens = sensitivity(model, calib, progress=False)
    for fraction in (0.3, 0.5):
        for rebuild in (False, True):
            start = time.perf_counter()
            plan = plan_for_budget(model, fraction=fraction, sens=sens)
            pruned = copy.deepcopy(model)
            if rebuild:
                prune_and_reconstruct(pruned, plan, calib, progress=False)
            else:
                apply_plan(pruned, plan)
            name = f"MiniLM planner {fraction:.0%}" + (" + reconstruction" if rebuild else ", no reconstruction")
            results.append(_row(name, model, plan, acc(pruned), dense, block_params, time.perf_counter() - start,
                                True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("decoder", "encoder"))
    parser.add_argument("--json", default="reports/quality.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: list = []
    if args.only in (None, "decoder"):
        decoder(results)
    if args.only in (None, "encoder"):
        encoder(results)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
