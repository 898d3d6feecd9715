"""What "quality" means for each kind of model, so the pipeline stays one code path.

One small class per role: the decoder is judged by perplexity on the test articles of the
Wikipedia text and recovered as a causal LM on the calibration articles, with the validation
articles for the Trainer's choices; the encoder is judged by sentiment accuracy on the test split
and recovered on the train split, validated on the validation split. Sizes come from the
profile, never the logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset, DatasetDict
from torch import nn

from .errors import SettingError
from . import data, sentiment, zoo
from .evaluate import perplexity
from .profiles import Profile
from .recovery import causal_lm_dataset
from .user_data import DataFiles


@dataclass
class DecoderTask:
    """Causal LM: perplexity on the held-out prose, recovery on the calibration prose.

    ``corpus``: the user's documents in the same splits (``user_data.text_corpus``) instead of the
    course's Wikipedia articles."""

    profile: Profile
    name: str
    corpus: DatasetDict | None = None
    quality_name = "perplexity"
    auto_class = "AutoModelForCausalLM"
    higher_is_better = False

    def model_config(self):
        """The decoder's config, without its weights: what ``pipeline.validate`` checks a run against."""
        return zoo.decoder_config(self.name)

    def load(self):
        model, self.tokenizer = zoo.load_decoder(self.name)
        return model.to(self.profile.torch_device())

    def calibration(self, seed: int = 0):
        return data.calibration_batches(self.tokenizer, self.profile.calib_samples, self.profile.calib_tokens, seed=seed,
                                        corpus=self.corpus)

    def planning_calibration(self, seed: int = 0):
        """Windows of the calibration split for the budget planner and reconstruction (more than
        the scores need: a least-squares refit of a 1,536-wide projection wants several thousand tokens)."""
        return data.calibration_batches(self.tokenizer, self.profile.plan_samples, self.profile.plan_tokens, seed=seed,
                                        corpus=self.corpus)

    def _held_out_ids(self) -> torch.Tensor:
        ids = self.tokenizer(data.prose_text("test", corpus=self.corpus), return_tensors="pt", verbose=False)["input_ids"][0]
        return ids[: self.profile.ppl_max_tokens] if self.profile.ppl_max_tokens else ids

    def quality(self, model: nn.Module) -> float:
        if not hasattr(self, "_ids"):
            self._ids = self._held_out_ids()
        return perplexity(model, self._ids, context=self.profile.ppl_context, stride=self.profile.ppl_stride)

    @property
    def recovery_tokens(self) -> int:
        return self.profile.recovery_tokens

    @property
    def recovery_batch(self) -> int:
        return self.profile.recovery_batch

    recovery_learning_rate = 3e-4  # best of 1e-5 / 1e-4 / 3e-4 at 32k tokens (benchmarks/recovery_recipes.py)

    def recovery_data(self, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Packed windows of the calibration split (shuffled by ``seed``) to train on, and the first
        ``profile.validation_windows`` of the validation split: never the test articles."""
        if not hasattr(self, "_recovery"):
            prose, seq = data.load_prose() if self.corpus is None else self.corpus, self.profile.recovery_seq
            self._recovery = (causal_lm_dataset(self.tokenizer, prose["calibration"]["text"], seq),
                              causal_lm_dataset(self.tokenizer, prose["validation"]["text"], seq,
                                                limit=self.profile.validation_windows))
        train, validation = self._recovery
        return train.shuffle(seed=seed), validation

    data_collator = None


@dataclass
class EncoderTask:
    """Sentiment classifier: accuracy on the test split, recovery on the train split.

    ``corpus``: the user's labelled texts in the same splits (``user_data.classifier_corpus``) instead
    of the movie-review snippets; the baseline classifier is then fine-tuned on them (and cached)."""

    profile: Profile
    name: str
    corpus: DatasetDict | None = None
    quality_name = "accuracy"
    auto_class = "AutoModelForSequenceClassification"
    higher_is_better = True

    def model_config(self):
        """The encoder's config, without its weights (the fine-tuned baseline shares its blocks)."""
        return zoo.encoder_config(self.name)

    def load(self):
        model, self.tokenizer, self.baseline_metrics = sentiment.load_baseline(self.profile.name, corpus=self.corpus)
        return model.to(self.profile.torch_device())

    def calibration(self, seed: int = 0, examples: int | None = None) -> list[dict]:
        """Batches of 8 labelled train examples (``profile.calib_samples`` of them unless ``examples``)."""
        train = self._splits()["train"].shuffle(seed=seed)
        train = train.select(range(min(examples or self.profile.calib_samples, len(train))))
        batch = self.tokenizer(list(train["text"]), padding=True, truncation=True,
                               max_length=sentiment.MAX_LENGTH, return_tensors="pt")
        return [{**{k: v[i:i + 8] for k, v in batch.items()}, "labels": torch.tensor(train["label"][i:i + 8])}
                for i in range(0, len(train), 8)]

    def planning_calibration(self, seed: int = 0) -> list[dict]:
        """``8 x profile.plan_samples`` train examples for the budget planner and reconstruction."""
        return self.calibration(seed, examples=8 * self.profile.plan_samples)

    def quality(self, model: nn.Module) -> float:
        return sentiment.sentiment_accuracy(model, self.tokenizer, limit=self.profile.eval_examples, corpus=self.corpus)

    @property
    def recovery_tokens(self) -> int:
        return self.profile.encoder_recovery_tokens

    recovery_batch = 32
    # the baseline's own rate: at 3e-4 no evaluation beat the pruned weights (MiniLM 30%, issue notes)
    recovery_learning_rate = 5e-5

    def recovery_data(self, seed: int = 0) -> tuple[Dataset, Dataset]:
        """The train examples the baseline was trained on (shuffled by ``seed``) and the whole
        validation split; the test split, which accuracy is reported on, is never seen. Recovery
        gets no data the dense baseline did not have, so "recovered vs dense" measures what
        recovery wins back, not what more data would add."""
        splits = self._splits()
        train = sentiment.baseline_train_split(self.profile.name, self.corpus)
        return (sentiment.tokenized(self.tokenizer, train.shuffle(seed=seed)),
                sentiment.tokenized(self.tokenizer, splits["validation"]))

    def _splits(self) -> DatasetDict:
        return data.load_sentiment() if self.corpus is None else self.corpus

    @property
    def data_collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)


def task_for(name: str, profile: Profile, files: DataFiles = DataFiles()):
    """The embedded encoder is judged by accuracy; the embedded decoder, hub ids and local directories (causal
    LMs) by perplexity. ``files``: the user's data for either, read and checked now, before any model loads."""
    if name in zoo.ENCODERS:
        return EncoderTask(profile, name, files.classifier_corpus())
    if name in zoo.DECODERS or "/" in name or zoo.is_local_path(name):
        return DecoderTask(profile, name, files.text_corpus())
    raise SettingError(f"{name!r} is neither a local directory, an embedded model nor a hub id like "
                       f"'HuggingFaceTB/SmolLM2-360M'; {zoo.available_models()}")
