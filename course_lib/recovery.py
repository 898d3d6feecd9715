"""Recovery fine-tuning with the Hugging Face Trainer: no hand-written training loop.

A pruned model loses quality; a short, gentle fine-tune wins much of it back. The recipe is the
same for both families: cosine schedule, 10% warm-up, a low learning rate, evaluation every
epoch, early stopping, and the best epoch's weights kept. Options: LoRA adapters through peft
(merged back afterwards, so the result is a plain pruned model again) and distillation from the
unpruned model (KL divergence between softened logits). The Trainer and accelerate handle
devices and multiple GPUs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, default_data_collator

from .pruned_modeling import adapter_for


@dataclass(frozen=True)
class RecoveryConfig:
    epochs: int = 2
    learning_rate: float = 5e-5
    batch_size: int = 8
    warmup: float = 0.1  # share of all steps
    patience: int = 1  # epochs without improvement before stopping
    weight_decay: float = 0.0
    lora_rank: int = 0  # 0 = train all weights; > 0 = LoRA adapters of this rank, merged at the end
    distill_alpha: float = 0.0  # weight of the KL term when a teacher is given (0 = plain loss)
    temperature: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1, "learning_rate": self.learning_rate > 0, "batch_size": self.batch_size >= 1,
            "warmup": 0 <= self.warmup < 1, "patience": self.patience >= 1, "lora_rank": self.lora_rank >= 0,
            "distill_alpha": 0 <= self.distill_alpha <= 1, "temperature": self.temperature > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"RecoveryConfig: invalid {bad[0]}={getattr(self, bad[0])!r} "
                             "(epochs, batch_size, patience >= 1; learning_rate, temperature > 0; "
                             "warmup in [0, 1); distill_alpha in [0, 1]; lora_rank >= 0)")


class DistillationTrainer(Trainer):
    """Trainer whose loss mixes the task loss with KL(teacher || student) on softened logits."""

    def __init__(self, *args, teacher: nn.Module, alpha: float, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        t = self.temperature
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(outputs.logits / t, dim=-1).flatten(0, -2),
            nn.functional.log_softmax(teacher_logits / t, dim=-1).flatten(0, -2),
            log_target=True, reduction="batchmean",
        ) * t * t
        loss = self.alpha * kl + (1 - self.alpha) * outputs.loss
        return (loss, outputs) if return_outputs else loss


def _lora_targets(model: nn.Module) -> list[str]:
    """Names of the block's linear layers, read off the adapter (LoRA wraps each of them)."""
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    linears = [*adapter.qkv(block), adapter.o_proj(block), *adapter.mlp_in(block), adapter.mlp_out(block)]
    names = {name.rsplit(".", 1)[-1] for name, module in block.named_modules() if any(module is l for l in linears)}
    return sorted(names)


def causal_lm_dataset(tokenizer, texts: list[str], block_size: int) -> Dataset:
    """Concatenate texts and cut them into full blocks of ``block_size`` tokens (labels = inputs)."""
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt")["input_ids"][0]
    n_blocks = ids.numel() // block_size
    if n_blocks < 1:
        raise ValueError(f"texts hold {ids.numel()} tokens, fewer than block_size={block_size}")
    blocks = ids[: n_blocks * block_size].reshape(n_blocks, block_size)
    return Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})


def fine_tune(model: nn.Module, train: Dataset, eval_set: Dataset, config: RecoveryConfig = RecoveryConfig(), *,
              teacher: nn.Module | None = None, data_collator=None, output_dir: str | None = None,
              progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on tokenised ``train``; returns the log history and best loss.

    The same recipe trains the task baseline and recovers a pruned model. ``train`` /
    ``eval_set`` hold model inputs (``input_ids``, optional ``attention_mask``) and ``labels``:
    token ids for a causal LM, class ids for a classifier. ``data_collator`` defaults to stacking
    equal-length rows; pass ``DataCollatorWithPadding`` for variable-length text.
    """
    if teacher is not None and config.distill_alpha == 0:
        raise ValueError("teacher given but distill_alpha=0; set distill_alpha in (0, 1]")
    trained = model
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        trained = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                   target_modules=_lora_targets(model), lora_dropout=0.0))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, num_train_epochs=config.epochs, learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
            lr_scheduler_type="cosine", warmup_steps=config.warmup, weight_decay=config.weight_decay,
            eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
            metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=1,
            save_only_model=True, logging_strategy="epoch", report_to="none", seed=config.seed,
            disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
        )
        kwargs = dict(model=trained, args=args, train_dataset=train, eval_dataset=eval_set,
                      data_collator=data_collator or default_data_collator,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=config.patience)])
        trainer = (DistillationTrainer(**kwargs, teacher=teacher, alpha=config.distill_alpha,
                                       temperature=config.temperature)
                   if teacher is not None else Trainer(**kwargs))
        trainer.train()
        history = trainer.state.log_history
    if config.lora_rank:
        trained.merge_and_unload()
    model.eval()
    return {"log_history": history, "best_eval_loss": min(h["eval_loss"] for h in history if "eval_loss" in h)}
