"""Recovery fine-tuning with the Hugging Face Trainer: no hand-written training loop.

A pruned model loses quality; training it a little more wins much of it back. What the recipe
fixes, and why:

- **A budget in tokens**, not epochs over whatever set is at hand: recipes, learning rates and
  iterative schedules are only comparable at equal compute. The budget becomes optimizer steps
  (rounded up to a multiple of ``evaluations``, so the last step is evaluated).
- **A validation set that is not the test set**: the Trainer evaluates on it ``evaluations``
  times, stops early after ``patience`` evaluations without improvement and keeps the best
  checkpoint. The weights from before training count as a candidate, so recovery never hands
  back a model that is worse on validation than the one it was given.
- **Distillation from the unpruned model** (as in Minitron): KL divergence between
  temperature-softened logits, scaled by T^2 so its gradients keep their size as T changes;
  optionally a hidden-state loss on matched layers. The teacher runs on the fly, in the same
  precision as the student.
- **LoRA** through peft, merged back, so the result is a plain pruned model again.
- Cosine schedule with warm-up; bf16 autocast where the hardware computes in bf16 faster than in fp32 (measured).

The Trainer and accelerate handle devices and processes: the same call runs under
``accelerate launch`` with several processes (DDP); ``batch_size`` is the global batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import (PrinterCallback, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator)

from .errors import SettingError
from .pruned_modeling import adapter_for


@dataclass(frozen=True)
class RecoveryConfig:
    tokens: int | None = None  # training tokens over all processes; None = ``epochs`` passes over the train set
    epochs: int = 1
    learning_rate: float = 3e-4  # best of 1e-5 / 1e-4 / 3e-4 for the course's decoder at 32k tokens
    batch_size: int = 8  # sequences (or examples) per optimizer step, over all processes
    warmup: float = 0.1  # share of all steps (whole steps, rounded down)
    evaluations: int = 4  # validation evaluations, evenly spaced; the last one is at the final step
    patience: int = 2  # evaluations without improvement before stopping
    weight_decay: float = 0.0
    lora_rank: int = 0  # 0 = train all weights; > 0 = LoRA adapters of this rank, merged at the end
    distill_alpha: float = 0.0  # weight of the KL term when a teacher is given (0 = plain loss)
    temperature: float = 2.0
    hidden_weight: float = 0.0  # weight of the hidden-state loss on matched layers (needs a teacher)
    freeze_embeddings: bool = False  # keep the (often tied) token embeddings fixed
    bf16: bool | None = None  # None: bf16 autocast where the device computes in bf16
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "tokens": self.tokens is None or self.tokens >= 1, "epochs": self.epochs >= 1,
            "learning_rate": self.learning_rate > 0, "batch_size": self.batch_size >= 1,
            "warmup": 0 <= self.warmup < 1, "evaluations": self.evaluations >= 1, "patience": self.patience >= 1,
            "lora_rank": self.lora_rank >= 0, "distill_alpha": 0 <= self.distill_alpha <= 1,
            "temperature": self.temperature > 0, "hidden_weight": self.hidden_weight >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise SettingError(f"RecoveryConfig: invalid {bad[0]}={getattr(self, bad[0])!r} "
                               "(tokens: None or >= 1; epochs, batch_size, evaluations, patience >= 1; "
                               "learning_rate, temperature > 0; warmup in [0, 1); distill_alpha in [0, 1]; "
                               "lora_rank, hidden_weight >= 0)")


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 autocast makes training on ``device`` faster: CUDA with bf16; a CPU whose bf16
    matrix products are measured faster than fp32 ones.

    A CPU flag is not enough: an Intel Xeon whose virtual machine reports AVX512-BF16 but no AMX
    multiplied a 512 x 576 by 576 x 1536 product slower in bf16 than in fp32, and a SmolLM2
    recovery of 4,096 tokens took 53-57 s with bf16 autocast against 34-41 s without (the course's
    2-core machine, 2026-12-02). So the CPU is asked the question directly, once per process.
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_bf16_faster()


@functools.cache
def _cpu_bf16_faster(rounds: int = 5) -> bool:
    """bf16 beats fp32 by at least 20% on a training-sized product, timed in turns (median of rounds)."""
    x, w = torch.randn(512, 576), torch.randn(1536, 576)
    operands = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in operands}
    for _ in range(rounds + 1):  # the first round warms up and is dropped below
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            nn.functional.linear(a, b)
            times[dtype].append(time.perf_counter() - start)
    median = {dtype: sorted(t[1:])[rounds // 2] for dtype, t in times.items()}
    return median[torch.bfloat16] < 0.8 * median[torch.float32]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, per position, times T^2.

    Positions are every index but the last (the vocabulary or classes). Computed in fp32 even
    under autocast: a bf16 log-softmax over 49k tokens loses the small probabilities KL is about.
    """
    t = temperature
    student = nn.functional.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    teacher = nn.functional.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over matched layers of ||h_s - h_t||^2 / ||h_t||^2 over the real tokens.

    With as many layers as the teacher (width pruning), every layer output is matched; otherwise
    (layers removed) only the final hidden state, the one place both models must agree. Relative
    to the teacher's norm, so that layers with large activations do not drown the others.
    """
    pairs = list(zip(student[1:], teacher[1:])) if len(student) == len(teacher) else [(student[-1], teacher[-1])]
    weight = torch.ones(pairs[0][1].shape[:-1], device=pairs[0][1].device) if mask is None else mask.float()
    losses = [((s.float() - t.float()).pow(2).sum(-1) * weight).sum() / (t.float().pow(2).sum(-1) * weight).sum()
              for s, t in pairs]
    return torch.stack(losses).mean()


def length_sorted_parts(inputs: dict, parts: int = 2) -> list[dict] | None:
    """A padded batch with one label per row, as ``parts`` batches of rows of similar length, each
    cut to the columns its rows use; None where there is nothing to gain (no attention mask,
    labels per token, fewer rows than parts, rows all of one length).

    The collator pads a batch to its longest row. On the course's review snippets (median 26
    tokens, longest 64) half of a random batch of 32 is padding; its two length-sorted halves
    carry a quarter fewer tokens, and eight MiniLM training steps took 4.7-5.5 s instead of
    6.4-7.3 s (2-core Xeon, 2026-12-03, ``wip/chunk_bench.py``; four parts gained no more).
    A classifier's loss is a mean over rows, so the row-share-weighted mean of the parts' losses
    is the batch's loss and its gradient the batch's gradient, up to float rounding.
    """
    mask, labels = inputs.get("attention_mask"), inputs.get("labels")
    if mask is None or labels is None or labels.dim() != 1 or len(labels) < parts:
        return None
    lengths = mask.sum(1)
    if bool((lengths == lengths[0]).all()):
        return None
    split = []
    for rows in torch.argsort(lengths, stable=True).tensor_split(parts):
        used = mask[rows].any(0)  # the columns any of these rows attends to (padding on either side)
        split.append({k: (v[rows][:, used] if v.dim() == 2 and v.shape == mask.shape else v[rows])
                      for k, v in inputs.items()})
    return split


class RecoveryTrainer(Trainer):
    """The Trainer, with each padded training batch of a classifier run as length-sorted parts
    (:func:`length_sorted_parts`): the same loss and gradient on a quarter fewer tokens.

    The parts' losses are summed before the one backward pass, so one optimizer step still sees
    the whole batch, and under several processes each process splits only its own share.
    """

    splits_rows = True  # whether the loss is a mean over rows (what makes the split exact)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = None if return_outputs or not self.splits_rows else length_sorted_parts(inputs)
        if parts is None:
            return self.batch_loss(model, inputs, return_outputs, num_items_in_batch)
        rows = len(inputs["labels"])
        return sum(self.batch_loss(model, part) * (len(part["labels"]) / rows) for part in parts)

    def batch_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class DistillationTrainer(RecoveryTrainer):
    """Trainer whose loss mixes the task loss with distillation from a frozen teacher."""

    def __init__(self, *args, teacher: nn.Module, alpha: float, temperature: float, hidden_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        # the hidden-state loss is a ratio of sums over all the batch's real tokens, not a mean over rows
        self.splits_rows = hidden_weight == 0

    def batch_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = self.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=hidden)
        with torch.no_grad(), self.accelerator.autocast():  # the teacher in the student's precision
            target = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=hidden)
        loss = (self.alpha * distillation_loss(outputs.logits, target.logits, self.temperature)
                + (1 - self.alpha) * outputs.loss)
        if hidden:
            loss = loss + self.hidden_weight * hidden_state_loss(outputs.hidden_states, target.hidden_states,
                                                                 inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss


class TokenProgress(TrainerCallback):
    """One progress bar in tokens: tokens/s, time left, and the latest training and validation loss."""

    def __init__(self, total_tokens: int, tokens_per_step: int):
        self.total, self.per_step, self.bar = total_tokens, tokens_per_step, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=self.total, unit="tok", unit_scale=True, desc="recovery")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.per_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "eval_loss")}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def _lora_targets(model: nn.Module, rank: int) -> list[str]:
    """Names of the block's linear layers, read off the family adapter (LoRA wraps each of them)."""
    try:
        adapter = adapter_for(model)
    except ValueError as error:
        raise SettingError(f"lora_rank={rank}: no LoRA target modules known for this model ({error}); "
                           "use lora_rank=0") from None
    block = adapter.blocks(model)[0]
    linears = [*adapter.qkv(block), adapter.o_proj(block), *adapter.mlp_in(block), adapter.mlp_out(block)]
    names = {name.rsplit(".", 1)[-1] for name, module in block.named_modules()
             if isinstance(module, nn.Linear) and any(module is linear for linear in linears)}
    if not names:
        raise SettingError(f"lora_rank={rank}: the model's blocks have no nn.Linear layers for LoRA to wrap "
                           "(a quantized model?); use lora_rank=0")
    return sorted(names)


def causal_lm_dataset(tokenizer, texts: list[str], block_size: int, limit: int | None = None) -> Dataset:
    """Concatenate texts and cut them into full blocks of ``block_size`` tokens (labels = inputs).

    Packing wastes no compute on padding and makes every step exactly ``batch x block_size``
    tokens, which is what a token budget counts. ``limit`` keeps the first blocks only.
    """
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt", verbose=False)["input_ids"][0]
    n_blocks = ids.numel() // block_size
    if n_blocks < 1:
        raise SettingError(f"texts hold {ids.numel()} tokens, fewer than block_size={block_size}")
    blocks = ids[: n_blocks * block_size].reshape(n_blocks, block_size)[:limit]
    return Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})


def tokens_per_row(dataset: Dataset) -> float:
    """Mean real tokens per row: the attention mask's count where there is one."""
    column = "attention_mask" if "attention_mask" in dataset.column_names else "input_ids"
    rows = dataset[column]
    return sum(sum(r) if column == "attention_mask" else len(r) for r in rows) / len(rows)


def shortest_first(rows: Dataset) -> Dataset:
    """``rows`` ordered by real length (stable), when they vary in length (an ``attention_mask`` column).

    The Trainer pads each evaluation batch to its longest row; batches of similar lengths carry
    little padding, so evaluation costs about half the tokens on the course's review sentences.
    The validation loss is a mean over rows, so the order changes it by float rounding only.
    """
    if "attention_mask" not in rows.column_names:
        return rows
    lengths = [sum(mask) for mask in rows["attention_mask"]]
    return rows.select(sorted(range(len(lengths)), key=lengths.__getitem__))


def training_steps(config: RecoveryConfig, train: Dataset) -> tuple[int, int]:
    """(optimizer steps, tokens per step) for the budget, steps rounded up to a multiple of ``evaluations``."""
    per_step = max(1, round(config.batch_size * tokens_per_row(train)))
    if config.tokens is not None:
        steps = math.ceil(config.tokens / per_step)
    else:
        steps = config.epochs * math.ceil(len(train) / config.batch_size)
    return math.ceil(steps / config.evaluations) * config.evaluations, per_step


def _check(model: nn.Module, train: Dataset, eval_set: Dataset, config: RecoveryConfig, teacher) -> list[str] | None:
    """Every setting checked before any training; returns the LoRA targets (or None)."""
    if teacher is not None and config.distill_alpha == 0 and config.hidden_weight == 0:
        raise SettingError("teacher given but distill_alpha=0 and hidden_weight=0; set distill_alpha in (0, 1] "
                           "or hidden_weight > 0")
    if teacher is None and (config.distill_alpha > 0 or config.hidden_weight > 0):
        raise SettingError(f"distill_alpha={config.distill_alpha}, hidden_weight={config.hidden_weight} need a "
                           "teacher (the unpruned model); pass teacher= or set both to 0")
    for name, split in (("train", train), ("eval_set", eval_set)):
        if len(split) == 0:
            raise SettingError(f"{name} is empty; recovery needs at least one row")
    return _lora_targets(model, config.lora_rank) if config.lora_rank else None


@contextlib.contextmanager
def _rng_untouched():
    """Restore the random generators afterwards (a DataLoader draws a seed from them each time it starts)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class BestWeights(TrainerCallback):
    """Early stopping on the validation loss, with the best evaluation's weights kept in memory.

    The Trainer's own way (``EarlyStoppingCallback`` with ``load_best_model_at_end``) writes a
    checkpoint to disk at every evaluation and reads the best one back at the end: 90 MB an
    evaluation for MiniLM, over 400 MB for a pruned SmolLM2, some eighty times in the course's
    notebooks. A copy in memory does the same job. Every process of a multi-process run sees the
    same validation loss and holds the same weights, so each keeps its own copy and all of them
    end on the same weights. Stops after ``patience`` evaluations in a row without a lower loss.
    """

    def __init__(self, patience: int):
        self.patience, self.best, self.step, self.waited, self.weights = patience, math.inf, None, 0, None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if metrics["eval_loss"] < self.best:
            self.best, self.step, self.waited = metrics["eval_loss"], state.global_step, 0
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.waited += 1
            control.should_training_stop = self.waited >= self.patience


FORWARD_ATTRIBUTES = ("forward", "_original_forward")  # what accelerate's mixed precision sets on a model


def _restore_forward(model: nn.Module, saved: dict) -> None:
    """Hand ``model`` back with the ``forward`` it came with (``saved``: its instance attributes before training).

    For mixed precision accelerate replaces ``model.forward`` with an autocast wrapper that casts
    the outputs back to fp32 (keeping the original as ``_original_forward``), and the Trainer
    leaves both on the model after training: every later forward then ran in bf16 while looking
    like fp32. In one demo run the recovered model's prefill read 1.7x faster than the pruned
    model of identical shapes, its decode 1.2x slower (the weights cast to bf16 on every step),
    and its perplexity was measured in bf16.
    """
    for name in FORWARD_ATTRIBUTES:
        model.__dict__.pop(name, None)
    model.__dict__.update(saved)


def fine_tune(model: nn.Module, train: Dataset, eval_set: Dataset, config: RecoveryConfig = RecoveryConfig(), *,
              teacher: nn.Module | None = None, data_collator=None, progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on tokenised ``train``, choosing weights on ``eval_set``.

    The same recipe trains the task baseline and recovers a pruned model. ``train`` /
    ``eval_set`` hold model inputs (``input_ids``, optional ``attention_mask``) and ``labels``:
    token ids for a causal LM, class ids for a classifier. ``data_collator`` defaults to stacking
    equal-length rows; pass ``DataCollatorWithPadding`` for variable-length text. Returns the
    Trainer's log history and a summary: tokens, steps, seconds, validation loss before and at
    the kept weights, and which weights were kept. The validation loss is the training
    objective on ``eval_set`` (with a teacher: the distillation loss). A run that fails or is
    interrupted restores the weights it started from.
    """
    targets = _check(model, train, eval_set, config, teacher)
    steps, per_step = training_steps(config, train)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bf16_supported(device) if config.bf16 is None else config.bf16
    args = TrainingArguments(
        output_dir="unused", max_steps=steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=1, per_device_eval_batch_size=config.batch_size,
        # Warm-up in whole steps, rounded down: the Trainer rounds a ratio up, and its first warm-up
        # step runs at learning rate 0, so a 1-step budget (a round of an iterative schedule) or 1 of 4
        # steps would be spent without training.
        lr_scheduler_type="cosine", warmup_steps=int(config.warmup * steps), weight_decay=config.weight_decay,
        eval_strategy="steps", eval_steps=steps // config.evaluations, save_strategy="no", logging_steps=1,
        report_to="none", seed=config.seed, disable_tqdm=True, use_cpu=device == "cpu", bf16=bf16,
    )
    if config.batch_size % args.world_size:
        raise SettingError(f"batch_size={config.batch_size} must be a multiple of the {args.world_size} processes")
    args.per_device_train_batch_size = config.batch_size // args.world_size
    before = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    frozen = model.get_input_embeddings().weight if config.freeze_embeddings else None
    if frozen is not None:
        frozen.requires_grad_(False)
    trained = model
    own_forward = {name: model.__dict__[name] for name in FORWARD_ATTRIBUTES if name in model.__dict__}
    try:
        if targets:
            from peft import LoraConfig, get_peft_model

            trained = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                       target_modules=targets, lora_dropout=0.0))
        with tempfile.TemporaryDirectory(prefix="course_lib-recovery-") as scratch:  # the Trainer's output_dir: unused
            args.output_dir = scratch
            kwargs = dict(model=trained, args=args, train_dataset=train, eval_dataset=shortest_first(eval_set),
                          data_collator=data_collator or default_data_collator)
            trainer = (DistillationTrainer(**kwargs, teacher=teacher, alpha=config.distill_alpha,
                                           temperature=config.temperature, hidden_weight=config.hidden_weight)
                       if teacher is not None else RecoveryTrainer(**kwargs))
            trainer.remove_callback(PrinterCallback)
            if progress:
                trainer.add_callback(TokenProgress(steps * per_step, per_step))
            with _rng_untouched():  # so that training draws exactly what it would without this evaluation
                initial = trainer.evaluate()["eval_loss"]
            # The evaluation prepared the model for inference and accelerate marked it prepared, so that
            # training would take it as it is, outside DistributedDataParallel: under several processes
            # each one trained alone on its share of every batch (transformers 5.17, accelerate 1.15).
            trained.__dict__.pop("_is_accelerate_prepared", None)
            kept_weights = BestWeights(config.patience)  # added after the evaluation above: it judges training's own
            trainer.add_callback(kept_weights)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        trained.load_state_dict(kept_weights.weights)
        if targets:
            trained.merge_and_unload()
    except BaseException:  # a failed or interrupted run hands back the model it was given, untouched
        if trained is not model:
            trained.unload()
        model.load_state_dict(before)
        raise
    finally:
        if frozen is not None:
            frozen.requires_grad_(True)
        _restore_forward(model, own_forward)
    history = trainer.state.log_history
    best, kept = kept_weights.best, f"best checkpoint (step {kept_weights.step})"
    if best >= initial:  # training never beat the weights it started from: hand those back
        model.load_state_dict(before)
        best, kept = initial, "the weights before training (no evaluation improved on them)"
    model.eval()
    done = trainer.state.global_step
    return {"log_history": history, "initial_eval_loss": initial, "best_eval_loss": best, "kept": kept,
            "steps": done, "planned_steps": steps, "tokens": done * per_step, "tokens_per_step": per_step,
            "seconds": seconds, "bf16": bf16}
