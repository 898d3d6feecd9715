"""Recovery recipes side by side at one token budget, on SmolLM2 pruned by 20% of its block parameters.

    .venv/bin/python benchmarks/recovery_recipes.py                      # every recipe, 32k tokens each
    .venv/bin/python benchmarks/recovery_recipes.py --tokens 65536 --only distill
    .venv/bin/python benchmarks/recovery_recipes.py --json reports/recovery_recipes.json

The pruned model: the budget planner at 20% of the decoder-layer parameters plus reconstruction,
calibrated on the quality protocol's 32 x 256 windows (``benchmarks/protocol.py``), built once and
saved under ``--pruned``. Each recipe then trains a fresh copy in a child process of its own (so
its peak memory is its own: ``ru_maxrss`` of that child) on packed 512-token windows of the
calibration split, evaluates on 16 windows of the validation split (early stopping, checkpoint
choice), and is reported on the protocol's test perplexity: 64 disjoint 512-token windows of the
test split, which no recipe sees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402

SEQ, VALIDATION_WINDOWS, BATCH = 512, 16, 4
# name -> RecoveryConfig settings; "teacher" marks recipes that distil from the unpruned model
RECIPES = {
    "none": None,
    "fine-tune lr 1e-5": dict(learning_rate=1e-5),
    "fine-tune lr 1e-4": dict(learning_rate=1e-4),
    "fine-tune lr 3e-4": dict(learning_rate=3e-4),
    "LoRA r16 lr 3e-4": dict(learning_rate=3e-4, lora_rank=16),
    "distill lr 1e-4": dict(learning_rate=1e-4, distill_alpha=1.0, teacher=True),
    "distill lr 3e-4": dict(learning_rate=3e-4, distill_alpha=1.0, teacher=True),
    "distill + hidden lr 3e-4": dict(learning_rate=3e-4, distill_alpha=1.0, hidden_weight=1.0, teacher=True),
}


def build_pruned(directory: Path) -> None:
    import torch

    import course_lib.pruned_modeling  # noqa: F401  (registers the pruned types)
    from course_lib import zoo
    from course_lib.budget import plan_for_budget
    from course_lib.reconstruction import prune_and_reconstruct

    torch.manual_seed(0)
    model, tokenizer = zoo.load_decoder("smollm2-135m")
    calib = protocol.calibration(tokenizer)
    plan = plan_for_budget(model, calib, fraction=0.2, progress=False)
    prune_and_reconstruct(model, plan, calib, progress=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_recipe(name: str, pruned: Path, tokens: int, common: dict) -> dict:
    """One recipe in this process: train a fresh copy of the pruned model, then the test perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import course_lib.pruned_modeling  # noqa: F401
    from course_lib import data, zoo
    from course_lib.recovery import RecoveryConfig, causal_lm_dataset, fine_tune

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(pruned)
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    row = {"recipe": name, "tokens": 0, "steps": 0, "minutes": 0.0}
    settings = RECIPES[name]
    if settings is not None:
        settings = dict(settings)
        teacher = zoo.load_decoder("smollm2-135m")[0] if settings.pop("teacher", False) else None
        prose = data.load_prose()
        train = causal_lm_dataset(tokenizer, prose["calibration"]["text"], SEQ).shuffle(seed=0)
        validation = causal_lm_dataset(tokenizer, prose["validation"]["text"], SEQ, limit=VALIDATION_WINDOWS)
        config = RecoveryConfig(tokens=tokens, batch_size=BATCH, **common, **settings)
        result = fine_tune(model, train, validation, config, teacher=teacher)
        row.update(tokens=result["tokens"], steps=result["steps"], minutes=result["seconds"] / 60,
                   initial_eval_loss=result["initial_eval_loss"], best_eval_loss=result["best_eval_loss"],
                   kept=result["kept"], bf16=result["bf16"])
    row["perplexity"] = protocol.ppl(model, protocol.held_out_ids(tokenizer))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--pruned", default="reports/recovery_recipes/pruned-20")
    parser.add_argument("--only", nargs="*", help="substrings of recipe names to run")
    parser.add_argument("--json", default="reports/recovery_recipes.json")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = dict(bf16=args.bf16, freeze_embeddings=args.freeze_embeddings)
    pruned = Path(args.pruned)
    if args.child:
        print("ROW " + json.dumps(run_recipe(args.child, pruned, args.tokens, common)), flush=True)
        return 0
    if not (pruned / "config.json").exists():
        start = time.perf_counter()
        build_pruned(pruned)
        print(f"built the pruned model in {time.perf_counter() - start:.0f} s: {pruned}", flush=True)
    names = [n for n in RECIPES if not args.only or any(s in n for s in args.only)]
    rows = []
    for name in names:
        flags = [f"--{'no-' if not v else ''}{k}" for k, v in (("bf16", args.bf16), ("freeze-embeddings",
                 args.freeze_embeddings)) if v is not None]
        child = subprocess.Popen([sys.executable, __file__, "--child", name, "--pruned", str(pruned),
                                  "--tokens", str(args.tokens), *flags], stdout=subprocess.PIPE, text=True)
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if status:
            print(f"{name}: failed (status {status})", flush=True)
            continue
        row = json.loads(next(line[4:] for line in output.splitlines() if line.startswith("ROW ")))
        row["peak_rss_mb"] = usage.ru_maxrss / 1024
        rows.append(row)
        print(f"{name:<28} {row['tokens']:>7} tokens {row['steps']:>4} steps {row['minutes']:5.1f} min "
              f"peak {row['peak_rss_mb']:6.0f} MB  test perplexity {row['perplexity']:.2f}", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "seq": SEQ, "batch": BATCH, "common": common, "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
