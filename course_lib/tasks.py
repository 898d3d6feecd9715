"""What "quality" means for each kind of model, so the pipeline stays one code path.

One small class per role: the decoder is judged by perplexity on held-out Wikipedia text and
recovered as a causal LM on the calibration text; the encoder is judged by sentiment accuracy
and recovered on the sentiment train split. Sizes come from the profile, never the logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from torch import nn

from . import data, sentiment, zoo
from .evaluate import perplexity
from .profiles import Profile


@dataclass
class DecoderTask:
    """Causal LM: perplexity on the held-out prose, recovery on the calibration prose."""

    profile: Profile
    name: str
    quality_name = "perplexity"
    higher_is_better = False

    def load(self):
        model, self.tokenizer = zoo.load_decoder(self.name)
        return model.to(self.profile.torch_device())

    def calibration(self, seed: int = 0):
        return data.calibration_batches(self.tokenizer, self.profile.calib_samples, self.profile.calib_tokens, seed=seed)

    def planning_calibration(self, seed: int = 0):
        """Windows of the calibration split for the budget planner and reconstruction (more than
        the scores need: a least-squares refit of a 1,536-wide projection wants several thousand tokens)."""
        return data.calibration_batches(self.tokenizer, self.profile.plan_samples, self.profile.plan_tokens, seed=seed)

    def _held_out_ids(self) -> torch.Tensor:
        ids = self.tokenizer(data.prose_text("test"), return_tensors="pt", verbose=False)["input_ids"][0]
        return ids[: self.profile.ppl_max_tokens] if self.profile.ppl_max_tokens else ids

    def quality(self, model: nn.Module) -> float:
        if not hasattr(self, "_ids"):
            self._ids = self._held_out_ids()
        return perplexity(model, self._ids, context=self.profile.ppl_context, stride=self.profile.ppl_stride)

    def recovery_data(self, seed: int = 0) -> tuple[Dataset, Dataset]:
        n, tokens = self.profile.calib_samples, self.profile.calib_tokens
        train = data.calibration_batches(self.tokenizer, 2 * n, tokens, seed=seed + 1)
        held = data.calibration_batches(self.tokenizer, max(n // 2, 2), tokens, seed=seed + 2, split="test")
        as_ds = lambda ids: Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})  # noqa: E731
        return as_ds(train), as_ds(held)

    data_collator = None


@dataclass
class EncoderTask:
    """Sentiment classifier: accuracy on the test split, recovery on the train split."""

    profile: Profile
    name: str
    quality_name = "accuracy"
    higher_is_better = True

    def load(self):
        model, self.tokenizer, self.baseline_metrics = sentiment.load_baseline(self.profile.name)
        return model.to(self.profile.torch_device())

    def calibration(self, seed: int = 0, examples: int | None = None) -> list[dict]:
        """Batches of 8 labelled train examples (``profile.calib_samples`` of them unless ``examples``)."""
        train = data.load_sentiment()["train"].shuffle(seed=seed).select(range(examples or self.profile.calib_samples))
        batch = self.tokenizer(list(train["text"]), padding=True, truncation=True,
                               max_length=sentiment.MAX_LENGTH, return_tensors="pt")
        return [{**{k: v[i:i + 8] for k, v in batch.items()}, "labels": torch.tensor(train["label"][i:i + 8])}
                for i in range(0, len(train), 8)]

    def planning_calibration(self, seed: int = 0) -> list[dict]:
        """``8 x profile.plan_samples`` train examples for the budget planner and reconstruction."""
        return self.calibration(seed, examples=8 * self.profile.plan_samples)

    def quality(self, model: nn.Module) -> float:
        return sentiment.sentiment_accuracy(model, self.tokenizer, limit=self.profile.eval_examples)

    def recovery_data(self, seed: int = 0) -> tuple[Dataset, Dataset]:
        splits = data.load_sentiment()
        n = 8 * self.profile.calib_samples
        train = splits["train"].shuffle(seed=seed).select(range(min(n, len(splits["train"]))))
        return (sentiment.tokenized(self.tokenizer, train),
                sentiment.tokenized(self.tokenizer, splits["validation"].select(range(min(n // 4, 1057)))))

    @property
    def data_collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)


def task_for(name: str, profile: Profile):
    """The embedded encoder is judged by accuracy; the embedded decoder and hub ids (causal LMs) by perplexity."""
    if name in zoo.ENCODERS:
        return EncoderTask(profile, name)
    if name in zoo.DECODERS or "/" in name:
        return DecoderTask(profile, name)
    choices = sorted([*zoo.ENCODERS, *zoo.DECODERS])
    raise ValueError(f"model={name!r} is unknown; choose one of {choices} or a hub id like 'HuggingFaceTB/SmolLM2-360M'")
