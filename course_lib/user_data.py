"""A user's own data in the course's two shapes, so the pipeline runs on it as on the embedded sets.

* **Text for a causal LM** (``text_corpus``): a plain-text file, whose documents are separated by
  blank lines (a file without blank lines: one document per line), or a CSV / JSON-lines /
  Parquet file with one document per row. The documents are
  split like the course's Wikipedia articles (``data.prose_splits``): ``test`` is held out for the
  perplexity a report states, ``validation`` serves the Trainer's choices, ``calibration`` the
  scores, reconstruction and recovery. Splitting by document keeps every paragraph of the held-out
  documents out of calibration and training.
* **Labelled texts for a classifier** (``classifier_corpus``): a train file and, optionally,
  validation and test files (CSV, JSON lines or Parquet, read through ``datasets``) with a text
  and a label column. Whatever is not given is held out of the train file, stratified by label,
  80/10/10 as the course's sentiment splits. Labels may be strings or integers; they become ids
  in sorted order, and a validation or test label the train file lacks is refused.

Everything is read and checked here, when the task is built: a missing file, column or label
fails before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from . import data
from .errors import SettingError

TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEXT_FORMATS = (".txt", ".md")
BLANK_LINE = re.compile(r"\n[ \t]*\n")  # separates documents in a plain-text file
MIN_DOCUMENTS = 3  # one each for calibration, validation and test


def _existing(path: str | Path, setting: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SettingError(f"{setting}={str(path)!r}: no such file", setting=setting)
    return path


def read_table(path: str | Path, setting: str, columns: tuple[str, ...]) -> Dataset:
    """The rows of a CSV / JSON-lines / Parquet file, checked to hold ``columns``."""
    path = _existing(path, setting)
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise SettingError(f"{setting}={str(path)!r}: the file type {path.suffix or '(none)'!r} is not read here; "
                           f"allowed: {', '.join(TABLE_FORMATS)}", setting=setting)
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a file of a few thousand rows reads in well under a second: no bar to flash by
    try:
        table = load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as error:  # datasets' parsers raise many types; the user needs the file and the reason
        raise SettingError(f"{setting}={str(path)!r} could not be read as {kind}: {error}", setting=setting) from None
    finally:
        if not quiet:
            enable_progress_bars()
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SettingError(f"{setting}={str(path)!r} has no column {', '.join(map(repr, missing))}; its columns: "
                           f"{', '.join(table.column_names)} (name yours with text_column= and label_column=)",
                           setting=setting)
    return table


def text_documents(path: str | Path, text_column: str = "text", setting: str = "text_file") -> list[str]:
    """The non-empty documents of a text file (blank-line separated) or of a table's ``text_column``."""
    path = _existing(path, setting)
    if path.suffix.lower() in TEXT_FORMATS or not path.suffix:
        try:
            text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        except UnicodeDecodeError as error:
            raise SettingError(f"{setting}={str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})",
                               setting=setting) from None
        chunks = BLANK_LINE.split(text) if BLANK_LINE.search(text) else text.splitlines()
    else:
        chunks = [str(t or "") for t in read_table(path, setting, (text_column,))[text_column]]
    documents = [chunk.strip() for chunk in chunks if chunk.strip()]
    if len(documents) < MIN_DOCUMENTS:
        raise SettingError(f"{setting}={str(path)!r} holds {len(documents)} document(s); at least {MIN_DOCUMENTS} are "
                           "needed, one each for calibration, validation and test (documents are separated by a "
                           "blank line, or are lines if the file has none)", setting=setting)
    return documents


def text_corpus(path: str | Path, text_column: str = "text") -> DatasetDict:
    """``text_documents`` split by document into the course's prose splits (``title``, ``text``)."""
    documents = text_documents(path, text_column)
    width = len(str(len(documents)))
    return data.prose_splits([{"title": f"document {i:0{width}d}", "text": text} for i, text in enumerate(documents)])


def classifier_corpus(train_file: str | Path, validation_file: str | Path = "", test_file: str | Path = "", *,
                      text_column: str = "text", label_column: str = "label") -> DatasetDict:
    """Train / validation / test with ``text`` and an integer ``label`` (a ``ClassLabel``)."""
    columns = (text_column, label_column)
    given = {"train": read_table(train_file, "train_file", columns)}
    for split, path, setting in (("validation", validation_file, "validation_file"), ("test", test_file, "test_file")):
        if path:
            given[split] = read_table(path, setting, columns)
    names = sorted({str(v) for v in given["train"][label_column]})
    if len(names) < 2:
        raise SettingError(f"train_file: the column {label_column!r} holds {len(names)} distinct label(s); a classifier "
                           "needs at least 2", setting="train_file")
    ids = {name: i for i, name in enumerate(names)}
    rows = {}
    for split, table in given.items():
        labels = [str(v) for v in table[label_column]]
        unknown = sorted(set(labels) - set(ids))
        if unknown:
            setting = f"{split}_file"
            raise SettingError(f"{setting}: labels {unknown[:5]} are not among the train file's labels "
                               f"({', '.join(names)})", setting=setting)
        rows[split] = ([str(t or "") for t in table[text_column]], [ids[v] for v in labels])
    missing = [split for split in ("validation", "test") if split not in rows]
    if missing:
        texts, labels = rows.pop("train")
        fractions = {"train": data.SENTIMENT_SPLITS["train"], **{s: data.SENTIMENT_SPLITS[s] for s in missing}}
        for split, indices in data.stratified_split(labels, fractions, data.SENTIMENT_SEED).items():
            rows[split] = ([texts[i] for i in indices], [labels[i] for i in indices])
    for split, (texts, _) in rows.items():
        if not texts:
            raise SettingError(f"train_file: too few rows to hold out a {split} split; give --{split}-file",
                               setting="train_file")
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict({split: Dataset.from_dict({"text": rows[split][0], "label": rows[split][1]}, features=features)
                        for split in ("train", "validation", "test")})


@dataclass(frozen=True)
class DataFiles:
    """The data settings of a run (``PruningConfig``'s file fields): nothing set means the course's data."""

    text_file: str = ""
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.text_file and self.train_file:
            raise SettingError(f"text_file={self.text_file!r} and train_file={self.train_file!r}: give one, not both "
                               "(text_file is a causal LM's text, train_file a classifier's labelled texts)",
                               setting="text_file")
        for setting in ("validation_file", "test_file"):
            if getattr(self, setting) and not self.train_file:
                raise SettingError(f"{setting}={getattr(self, setting)!r} needs train_file= as well: the classifier's "
                                   "labels come from it", setting=setting)

    def describe(self) -> str:
        """What the run reads, for the report."""
        if self.text_file:
            return f"documents of {self.text_file} (column {self.text_column!r} if a table), split by document"
        if self.train_file:
            given = [f"{s} {getattr(self, f'{s}_file')}" for s in ("train", "validation", "test")
                     if getattr(self, f"{s}_file")]
            held = [s for s in ("validation", "test") if not getattr(self, f"{s}_file")]
            return (f"{', '.join(given)} (texts {self.text_column!r}, labels {self.label_column!r})"
                    + (f"; {' and '.join(held)} held out of the train file, stratified by label" if held else ""))
        return "the course's (Wikipedia articles for a causal LM, movie-review snippets for the classifier)"

    def text_corpus(self) -> DatasetDict | None:
        """The causal LM's documents, or None for the course's Wikipedia articles."""
        if self.train_file:
            raise SettingError(f"train_file={self.train_file!r} is a classifier's data; a causal LM reads text_file=",
                               setting="train_file")
        return text_corpus(self.text_file, self.text_column) if self.text_file else None

    def classifier_corpus(self) -> DatasetDict | None:
        """The classifier's labelled splits, or None for the course's movie-review snippets."""
        if self.text_file:
            raise SettingError(f"text_file={self.text_file!r} is a causal LM's text; a classifier reads train_file= "
                               "(validation_file= and test_file= optional)", setting="text_file")
        if not self.train_file:
            return None
        return classifier_corpus(self.train_file, self.validation_file, self.test_file,
                                 text_column=self.text_column, label_column=self.label_column)


# Two files the course never uses, for trying the above on: ``python -m course_lib examples --out DIR``.
AMAZON_MEMBER = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"


def write_examples(directory: str | Path) -> dict[Path, str]:
    """Write ``amazon_reviews.csv`` and ``lee_news.txt`` into ``directory``; returns what each holds.

    * ``amazon_reviews.csv``: the Amazon product-review snippets of Hutto & Gilbert (ICWSM 2014), from
      the archive in the ``vaderSentiment`` sdist that also holds the course's movie reviews (a
      different set). Columns ``review`` and ``sentiment`` (``positive`` / ``negative``, the sign of
      the mean human rating; snippets rated exactly 0 dropped).
    * ``lee_news.txt``: the Lee background corpus of 300 Australian news articles from the ``gensim``
      wheel's test data, one article per line (the file has no blank lines).

    Both are read from the course's download cache (``make fetch``); nothing is downloaded.
    """
    import csv
    import io
    import tarfile
    import zipfile

    from .downloads import cached

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(cached(data.VADER)) as outer:
        inner = tarfile.open(fileobj=io.BytesIO(outer.extractfile(data.SNIPPETS_TARBALL).read()))
        lines = inner.extractfile(AMAZON_MEMBER).read().decode("utf-8").splitlines()
    snippets = [s for s in data.parse_snippets(lines) if s.rating != 0]
    reviews = directory / "amazon_reviews.csv"
    with reviews.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["review", "sentiment"])
        writer.writerows((s.text, "positive" if s.rating > 0 else "negative") for s in snippets)
    with zipfile.ZipFile(cached(data.GENSIM)) as wheel:
        news = wheel.read(LEE_MEMBER).decode("utf-8")
    (directory / "lee_news.txt").write_text(news, encoding="utf-8")
    articles = sum(1 for line in news.splitlines() if line.strip())
    return {reviews: f"{len(snippets)} labelled reviews (columns review, sentiment)",
            directory / "lee_news.txt": f"{articles} news articles, one per line"}
