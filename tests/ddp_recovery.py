"""Recovery under ``accelerate launch`` with several processes; run by tests/test_recovery_ddp.py.

    accelerate launch --cpu --num_processes 2 tests/ddp_recovery.py OUT_DIR

Every process runs this same file (DDP): it prunes the same tiny Llama, recovers it with
``fine_tune`` exactly as a single process would, and writes what the test compares: its rank's
validation losses and a digest of its final weights. Rank 0 also saves the model.
"""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import weights_digest, wide_llama  # noqa: E402

from course_lib.plan import PruningPlan  # noqa: E402
from course_lib.recovery import RecoveryConfig, fine_tune  # noqa: E402
from course_lib.surgery import apply_plan  # noqa: E402


def counting(n: int, seed: int) -> Dataset:
    """Sequences counting up modulo 64 from a random start: learnable, and the same on every rank."""
    starts = torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = ((starts + torch.arange(16)) % 64).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main(out: Path) -> None:
    rank = int(os.environ.get("RANK", 0))
    model = apply_plan(wide_llama(), PruningPlan(heads={0: [1, 3]}, neurons={1: list(range(8))}))
    result = fine_tune(model, counting(128, 1), counting(16, 2),
                       RecoveryConfig(tokens=4096, batch_size=8, learning_rate=3e-3, patience=4, bf16=False),
                       progress=False)
    digest = weights_digest(model)
    world = int(os.environ.get("WORLD_SIZE", 1))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": world, "digest": digest, "initial_eval_loss": result["initial_eval_loss"],
        "best_eval_loss": result["best_eval_loss"], "steps": result["steps"], "tokens": result["tokens"]}))
    if rank == 0:
        model.save_pretrained(out / "model")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
