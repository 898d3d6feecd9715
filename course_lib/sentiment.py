"""The encoder's task: MiniLM with a classification head on the movie-review snippets.

The fine-tuned baseline is trained once with the HF Trainer (the same recipe as recovery) and
cached as safetensors under ``data/cache/models/``, so notebooks and the pipeline reuse it.
Every function also takes a user's ``corpus`` (``user_data.classifier_corpus``) in place of the
snippets: its baseline is cached under a hash of the data, so other data never reuses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

from . import zoo
from .data import load_sentiment
from .evaluate import classifier_accuracy
from .paths import build_once, cache_dir, staged_directory
from .profiles import get_profile
from .recovery import RecoveryConfig, fine_tune

MAX_LENGTH = 64  # tokens; covers 99.5% of the snippets (median 26)
# two epochs, evaluated after each; fp32 everywhere, so the cached baseline is the same on every machine
BASELINE_CONFIG = RecoveryConfig(epochs=2, learning_rate=5e-5, batch_size=32, evaluations=2, patience=1, bf16=False)


def tokenized(tokenizer, split: Dataset) -> Dataset:
    """Model inputs and labels for one split (padding is left to the collator)."""
    encoded = tokenizer(list(split["text"]), truncation=True, max_length=MAX_LENGTH)
    return Dataset.from_dict({**encoded, "labels": list(split["label"])})


@functools.lru_cache(maxsize=3)
def split_rows(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(texts, labels) of one split of the movie snippets, read once per process: reading the
    splits verifies and parses the source file (a third of a second), which an iterative
    schedule measuring accuracy and drawing calibration batches dozens of times would otherwise
    pay every time."""
    rows = load_sentiment()[split]
    return tuple(rows["text"]), tuple(rows["label"])


def _test_rows(limit: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(texts, labels) of the test split's first ``limit`` rows (all if 0)."""
    texts, labels = split_rows("test")
    return (texts[:limit], labels[:limit]) if limit else (texts, labels)


def sentiment_accuracy(model, tokenizer, limit: int = 0, corpus: DatasetDict | None = None) -> float:
    """Accuracy on the held-out test split (the first ``limit`` rows if ``limit`` > 0)."""
    if corpus is None:
        texts, labels = _test_rows(limit)
    else:
        test = corpus["test"].select(range(min(limit, len(corpus["test"])))) if limit else corpus["test"]
        texts, labels = test["text"], test["label"]
    return classifier_accuracy(model, tokenizer, texts, labels, max_length=MAX_LENGTH)


def corpus_digest(corpus: DatasetDict) -> str:
    """A short hash of every split's texts and labels and of the label names: the cache key of a baseline."""
    digest = hashlib.sha256(json.dumps(corpus["train"].features["label"].names).encode())
    for split in ("train", "validation", "test"):
        digest.update(json.dumps([list(corpus[split]["text"]), list(corpus[split]["label"])]).encode())
    return digest.hexdigest()[:16]


def baseline_dir(profile: str | None = None, corpus: DatasetDict | None = None) -> Path:
    data = "sentiment" if corpus is None else f"data-{corpus_digest(corpus)}"
    return cache_dir() / "models" / f"minilm-l6-{data}-{get_profile(profile).name}"


def baseline_train_split(profile: str | None = None, corpus: DatasetDict | None = None) -> Dataset:
    """The train examples the profile's baseline is fine-tuned on: the first ``train_examples``
    of the train split (all of it when 0)."""
    train = (load_sentiment() if corpus is None else corpus)["train"]
    n = get_profile(profile).train_examples
    return train.select(range(min(n, len(train)))) if n else train


def train_baseline(config: RecoveryConfig = BASELINE_CONFIG, profile: str | None = None,
                   progress: bool = True, corpus: DatasetDict | None = None) -> Path:
    """Fine-tune MiniLM on the train split (validation for early stopping) and cache it.

    The ``ci`` profile trains on a fixed 2,048-example subset to stay within minutes on 2 CPU
    cores; ``full`` uses all 8,454. Accuracy is always measured on the whole test split.
    """
    data = load_sentiment() if corpus is None else corpus
    torch.manual_seed(config.seed)  # the new classification head: the same on every machine, whatever ran before
    names = data["train"].features["label"].names
    model, tokenizer = zoo.load_encoder_classifier("minilm-l6", num_labels=len(names))
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    train = baseline_train_split(profile, corpus)
    fine_tune(model, tokenized(tokenizer, train), tokenized(tokenizer, data["validation"]), config,
              data_collator=DataCollatorWithPadding(tokenizer), progress=progress)
    accuracy = sentiment_accuracy(model, tokenizer, corpus=corpus)
    dest = baseline_dir(profile, corpus)
    with staged_directory(dest) as staged:  # a crash never leaves a half-written baseline behind
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        metrics = {"test_accuracy": accuracy, "test_examples": len(data["test"]), "train_examples": len(train)}
        (staged / "metrics.json").write_text(json.dumps(metrics))
    return dest


def load_baseline(profile: str | None = None, progress: bool = True, corpus: DatasetDict | None = None):
    """(model, tokenizer, metrics) of the fine-tuned classifier, training it first if needed."""
    directory = build_once(baseline_dir(profile, corpus), "metrics.json",
                           lambda: train_baseline(profile=profile, progress=progress, corpus=corpus))
    model = BertForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer, json.loads((directory / "metrics.json").read_text())
