"""A user's own files: documents split by document for a causal LM, labelled splits for a classifier,
and every mistake in a file or a setting refused by name before a model is loaded."""

from __future__ import annotations

import json

import pytest

from course_lib.errors import SettingError
from course_lib.pipeline import PruningConfig
from course_lib.tasks import DecoderTask, EncoderTask, task_for
from course_lib.profiles import get_profile
from course_lib.user_data import DataFiles, classifier_corpus, text_corpus, text_documents


def _documents(n: int) -> list[str]:
    return [f"Document {i} says something.\nIts second line, also document {i}." for i in range(n)]


def test_a_text_file_splits_by_document_and_never_splits_one(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n  \n".join(_documents(40)) + "\n")
    corpus = text_corpus(path)
    assert set(corpus) == {"calibration", "validation", "test"}
    texts = {split: list(corpus[split]["text"]) for split in corpus}
    assert sorted(sum(texts.values(), [])) == sorted(_documents(40))  # every document once, whole
    assert len(texts["test"]) == 4 and len(texts["validation"]) == 3 and len(texts["calibration"]) == 33
    assert texts == {split: list(text_corpus(path)[split]["text"]) for split in corpus}  # the same split every time
    lines = tmp_path / "lines.txt"
    lines.write_text("first document\nsecond document\nthird document\n")
    assert text_documents(lines) == ["first document", "second document", "third document"]


def test_documents_from_a_table_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(_documents(5))))
    assert text_documents(path, "body") == _documents(5)
    with pytest.raises(SettingError, match=r"has no column 'text'; its columns: body, id"):
        text_documents(path)


@pytest.mark.parametrize("name,content,message", [
    ("missing.txt", None, r"text_file='.*missing.txt': no such file"),
    ("two.txt", "one document\n\nand another", r"holds 2 document\(s\); at least 3"),
    ("data.xlsx", "x", r"the file type '.xlsx' is not read here; allowed: .csv, .tsv, .json, .jsonl, .parquet"),
    ("latin.txt", b"caf\xe9\n\nb\n\nc", r"is not UTF-8 text"),
])
def test_a_bad_text_file_is_refused_by_name(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SettingError, match=message) as raised:
        text_documents(path)
    assert raised.value.setting == "text_file"


def _reviews(path, rows):
    path.write_text("review,stars\n" + "".join(f"\"{text}\",{label}\n" for text, label in rows))
    return path


def test_a_train_file_alone_is_split_stratified_with_string_labels(tmp_path):
    rows = [(f"good film {i}", "pos") for i in range(60)] + [(f"bad film {i}", "neg") for i in range(40)]
    corpus = classifier_corpus(_reviews(tmp_path / "train.csv", rows), text_column="review", label_column="stars")
    assert corpus["train"].features["label"].names == ["neg", "pos"]
    assert [len(corpus[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    for split in ("validation", "test"):  # label shares kept: 6 pos and 4 neg of 10
        assert sorted(corpus[split]["label"]) == [0] * 4 + [1] * 6
    seen = [t for s in corpus.values() for t in s["text"]]
    assert sorted(seen) == sorted(t for t, _ in rows)  # no row lost, none in two splits
    pairs = dict(rows)
    assert all(pairs[t] == ["neg", "pos"][label] for t, label in zip(corpus["test"]["text"], corpus["test"]["label"]))


def test_given_validation_and_test_files_are_used_as_they_are(tmp_path):
    train = _reviews(tmp_path / "train.csv", [("fine", 1), ("awful", 0)] * 10)
    test = _reviews(tmp_path / "test.csv", [("lovely", 1), ("dull", 0), ("grim", 0)])
    corpus = classifier_corpus(train, test_file=test, text_column="review", label_column="stars")
    assert list(corpus["test"]["text"]) == ["lovely", "dull", "grim"] and list(corpus["test"]["label"]) == [1, 0, 0]
    assert len(corpus["train"]) + len(corpus["validation"]) == 20 and len(corpus["validation"]) == 2
    odd = _reviews(tmp_path / "odd.csv", [("meh", 2), ("ok", 1)])
    with pytest.raises(SettingError, match=r"test_file: labels \['2'\] are not among the train file's labels \(0, 1\)"):
        classifier_corpus(train, test_file=odd, text_column="review", label_column="stars")
    one = _reviews(tmp_path / "one.csv", [("fine", 1)] * 5)
    with pytest.raises(SettingError, match="holds 1 distinct label"):
        classifier_corpus(one, text_column="review", label_column="stars")
    with pytest.raises(SettingError, match=r"has no column 'label'; its columns: review, stars"):
        classifier_corpus(train, text_column="review")


def test_data_settings_that_contradict_each_other_or_the_model(tmp_path):
    with pytest.raises(SettingError, match="not both"):
        PruningConfig(text_file="a.txt", train_file="b.csv")
    with pytest.raises(SettingError, match="needs train_file= as well"):
        PruningConfig(test_file="t.csv")
    profile = get_profile("ci")
    with pytest.raises(SettingError, match="a causal LM reads text_file="):
        task_for("smollm2-135m", profile, DataFiles(train_file="b.csv"))
    with pytest.raises(SettingError, match="a classifier reads train_file"):
        task_for("minilm-l6", profile, DataFiles(text_file="a.txt"))
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(_documents(12)))
    task = task_for("smollm2-135m", profile, DataFiles(text_file=str(docs)))
    assert isinstance(task, DecoderTask) and len(task.corpus["test"]) == 1
    train = _reviews(tmp_path / "train.csv", [("fine", 1), ("awful", 0)] * 10)
    task = task_for("minilm-l6", profile, DataFiles(train_file=str(train), text_column="review", label_column="stars"))
    assert isinstance(task, EncoderTask) and len(task.corpus["train"]) == 16
    assert task_for("minilm-l6", profile).corpus is None
