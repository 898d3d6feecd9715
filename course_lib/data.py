"""The course's two data sets, made from files that ship inside pinned PyPI packages.

* **Sentiment** (fine-tuning and accuracy after pruning): the 10,605 movie-review snippets of
  Hutto & Gilbert (ICWSM 2014), found in the ``vaderSentiment==3.3.2`` sdist under
  ``additional_resources/hutto_ICWSM_2014.tar.gz``. Each has a mean human rating in [-4, 4]; the
  sign is the label and the 37 snippets rated exactly 0 are dropped. :func:`load_sentiment`.
* **Prose** (calibration of pruning scores and held-out perplexity): the 106 Wikipedia articles of
  the shortened enwiki dump in the ``gensim==4.4.0`` wheel, stripped of wiki markup and split by
  article, so no paragraph of the held-out articles is ever seen during calibration.
  :func:`load_prose`, :func:`prose_text`, :func:`calibration_batches`.

Why packages: the course runs offline and in CI, where only the package registries are reachable.
Every file is sha256-pinned, the downloads (in :mod:`course_lib.downloads`) and the files derived
from them alike, so a corrupted or half-written cache file is caught, never silently used.

Network policy: only :func:`fetch_all` downloads (and rebuilds a missing or corrupted derived
file). The ``load_*`` functions read the cache and nothing else: when a file is missing or fails
its checksum they raise :class:`~course_lib.downloads.CacheError` saying which command to run.
So an offline notebook fails at once with that instruction, never with a pip traceback or a hang,
and loading never rewrites the cache behind the learner's back.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import random
import re
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import mwparserfromhell
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from mwparserfromhell.nodes import Wikilink
from safetensors import safe_open
from safetensors.torch import save

from .errors import SettingError
from .downloads import Artifact, CacheError, cached, fetch, sha256_of, verify
from .paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VADER = Artifact(
    spec="vaderSentiment==3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True,
)
# pip names the wheel for this interpreter and platform (CPython 3.11, x86_64 Linux); the
# pinned file is the one the course's machines get.
GENSIM = Artifact(
    spec="gensim==4.4.0",
    filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
)

SNIPPETS_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
WIKI_MEMBER = (
    "gensim/test/test_data/"
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)

LABEL_NAMES = ["negative", "positive"]
SENTIMENT_SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
SENTIMENT_SEED = 2014  # a constant: changing it changes every split, and every number in the course
PROSE_TEST_FRACTION = 0.1
PROSE_SEED = 2016  # a constant; its test split holds 11 articles, ~323k characters (>= 50k needed)
PROSE_VALIDATION_FRACTION = 0.08  # of the articles left after the test split: 8 articles, ~45k tokens
PROSE_VALIDATION_SEED = 2017
PROSE_SPLITS = ("calibration", "validation", "test")


@dataclass(frozen=True)
class Derived:
    """A cache file made locally from a downloaded artifact, pinned like the download itself."""

    relpath: str
    sha256: str
    source: Artifact
    build: Callable[[Path], bytes]  # verified source file -> the derived file's bytes

    @property
    def path(self) -> Path:
        return cache_dir() / self.relpath


# ----------------------------------------------------------------------------- cache plumbing


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then
    renamed over ``path`` (a rename within one file system is atomic).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary folder
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ensure(derived: Derived) -> Path:
    """Build ``derived`` from its verified source unless a verified copy is already cached."""
    if derived.path.exists() and sha256_of(derived.path) == derived.sha256:
        return derived.path
    data = derived.build(cached(derived.source))
    actual = hashlib.sha256(data).hexdigest()
    if actual != derived.sha256:
        raise CacheError(
            f"rebuilding {derived.relpath} gave sha256 {actual[:12]}..., expected "
            f"{derived.sha256[:12]}...: the result depends on the pinned package versions "
            "(mwparserfromhell==0.7.2); reinstall requirements.txt"
        )
    atomic_write(derived.path, data)
    return derived.path


def fetch_all() -> list[Path]:
    """Download both packages and make the derived files; fast and offline once all is cached.

    Returns the verified cache paths. Raises :class:`CacheError` (with the command to run) when a
    download is needed but the package registry cannot be reached.
    """
    paths = []
    for derived in (SNIPPETS, PROSE):
        paths.append(fetch(derived.source))
        paths.append(_ensure(derived))
    return paths


# ----------------------------------------------------------------------------- sentiment


def _extract_snippets(sdist: Path) -> bytes:
    """The movie-snippet file, read from the tarball inside the tarball (nothing else unpacked)."""
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(SNIPPETS_TARBALL).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        return inner.extractfile(SNIPPETS_MEMBER).read()


SNIPPETS = Derived(
    relpath="sentiment/movieReviewSnippets_GroundTruth.txt",
    sha256="c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    source=VADER,
    build=_extract_snippets,
)


@dataclass(frozen=True)
class Snippet:
    id: int
    rating: float
    text: str


def read_snippets(path: Path) -> list[Snippet]:
    """Parse the tab-separated ``id, mean rating, text`` lines (CRLF line ends).

    The file is UTF-8 (strict decoding succeeds and its non-ASCII characters are the expected
    accented letters, en dashes and curly quotes: no latin-1 mojibake). Runs of spaces, which
    stand in for the dashes of the original reviews, are collapsed to one.
    """
    return parse_snippets(path.read_bytes().decode("utf-8").replace("\r\n", "\n").rstrip("\n").split("\n"))


def parse_snippets(lines: Sequence[str]) -> list[Snippet]:
    """``read_snippets``' parsing of lines already read (the other snippet files of the same archive too)."""
    snippets = []
    for line in lines:
        if not line.strip():
            continue
        id_, rating, text = line.split("\t", 2)
        snippets.append(Snippet(int(id_), float(rating), " ".join(text.split())))
    return snippets


def stratified_split(
    labels: Sequence[int], fractions: dict[str, float], seed: int
) -> dict[str, list[int]]:
    """Row indices per split, drawn per label so every split keeps the overall label shares.

    Each label's rows are shuffled with one seeded generator and cut in the order of
    ``fractions`` (all but the first split get ``round(n * fraction)`` rows, the first gets the
    rest); each split is then shuffled, so the rows do not come grouped by label.
    """
    rng = random.Random(seed)
    names = list(fractions)
    splits: dict[str, list[int]] = {name: [] for name in names}
    for label in sorted(set(labels)):
        rows = [i for i, value in enumerate(labels) if value == label]
        rng.shuffle(rows)
        start = 0
        for name in reversed(names[1:]):
            size = round(len(rows) * fractions[name])
            splits[name] += rows[start : start + size]
            start += size
        splits[names[0]] += rows[start:]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def load_sentiment() -> DatasetDict:
    """Train/validation/test (80/10/10, stratified, fixed) of the nonzero-rated movie snippets.

    Columns: ``text``, ``label`` (0 negative, 1 positive: the sign of ``rating``), ``rating``
    (mean human rating, -4..4) and ``id`` (line number in the source file). Of the 10,605
    snippets, 10,568 remain (5,242 positive, 5,326 negative): 8,454 / 1,057 / 1,057 rows.
    Reads only the cache.
    """
    snippets = [s for s in read_snippets(verify(SNIPPETS.path, SNIPPETS.sha256)) if s.rating != 0]
    labels = [int(s.rating > 0) for s in snippets]
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=LABEL_NAMES),
            "rating": Value("float64"),
            "id": Value("int32"),
        }
    )
    splits = stratified_split(labels, SENTIMENT_SPLITS, SENTIMENT_SEED)
    return DatasetDict(
        {
            name: Dataset.from_dict(
                {
                    "text": [snippets[i].text for i in rows],
                    "label": [labels[i] for i in rows],
                    "rating": [snippets[i].rating for i in rows],
                    "id": [snippets[i].id for i in rows],
                },
                features=features,
            )
            for name, rows in splits.items()
        }
    )


# ----------------------------------------------------------------------------- prose

# Sections after which an article holds lists of sources and links rather than prose.
BACK_MATTER = {
    "see also", "references", "notes", "footnotes", "citations", "sources", "bibliography",
    "further reading", "external links", "notes and references", "references and notes",
    "works cited", "primary sources", "secondary sources", "external links and references",
}  # fmt: skip
# Tags whose contents are not running text: citations, tables, formulas, image galleries.
DROPPED_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
    "score", "syntaxhighlight", "source", "pre", "hiero",
}  # fmt: skip
HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
HIDDEN_LINK = re.compile(r"\s*:?\s*(file|image|media|category)\s*:", re.IGNORECASE)
INTERLANGUAGE_LINK = re.compile(r"[a-z]{2,3}(-[a-z]+)*:", re.IGNORECASE)
MARKUP_LEFTOVERS = ("{{", "}}", "[[", "]]", "==", "{|", "|}", "|", "<", ">")
EMPTY_BRACKETS = re.compile(r"\s*\(\s*[,;:]?\s*\)")
OPEN_BRACKET_PUNCTUATION = re.compile(r"\(\s*[,;:]\s*")
SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:])(?=\s|$)")
MIN_PARAGRAPH_WORDS = 8  # shorter lines are captions, list items, table cells, not prose


def iter_articles(xml: BinaryIO) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of each article of a MediaWiki XML dump, in dump order.

    Articles are pages of the main namespace (``<ns>0</ns>``) that are not redirects. The tags
    carry the export schema's namespace, which is read from the root element, not hard-coded.
    """
    ns = ""
    for event, element in ET.iterparse(xml, events=("start", "end")):
        if event == "start":
            ns = ns or element.tag.partition("}")[0] + "}"
        elif element.tag == f"{ns}page":
            main_namespace = element.findtext(f"{ns}ns") == "0"
            if main_namespace and element.find(f"{ns}redirect") is None:
                text = element.findtext(f"{ns}revision/{ns}text") or ""
                yield element.findtext(f"{ns}title"), text
            element.clear()


def _body_without_headings(wikitext: str) -> str:
    """``wikitext`` without its heading lines and without its back-matter sections.

    Line-based, as MediaWiki reads headings: a heading of level 1 or 2 switches skipping on (back
    matter) or off (anything else), deeper ones inherit their section's state. (Walking the parse
    tree instead would miss headings that the parser nests inside an unclosed ``''`` italic.)
    """
    kept, skipping = [], False
    for line in wikitext.splitlines():
        heading = HEADING.match(line)
        if heading is None:
            if not skipping:
                kept.append(line)
            continue
        if len(heading[1]) <= 2:
            title = mwparserfromhell.parse(heading[2]).strip_code().strip().lower()
            skipping = title in BACK_MATTER
        kept.append("")  # keeps the paragraphs before and after apart
    return "\n".join(kept)


def _is_hidden_link(link: Wikilink) -> bool:
    """Images, categories and interlanguage links, which render as no text in the article."""
    title = str(link.title)
    return bool(HIDDEN_LINK.match(title)) or (
        link.text is None and INTERLANGUAGE_LINK.match(title) is not None
    )


def _tidy(line: str) -> str:
    """Collapse whitespace and the empty brackets and stray commas that removed templates leave."""
    line = " ".join(line.split())
    line = EMPTY_BRACKETS.sub("", line)
    line = OPEN_BRACKET_PUNCTUATION.sub("(", line)
    return SPACE_BEFORE_PUNCTUATION.sub(r"\1", line)


def _is_prose(line: str) -> bool:
    return len(line.split()) >= MIN_PARAGRAPH_WORDS and not any(m in line for m in MARKUP_LEFTOVERS)


def clean_wikitext(wikitext: str) -> str:
    """Plain paragraphs (one per line) of an article's wikitext.

    Back-matter sections and headings are dropped; citations, tables, formulas, images,
    categories and interlanguage links are emptied in place (emptying is linear, where removing
    nodes one by one searches the whole tree each time); ``strip_code`` then drops templates
    and the remaining markup. Last, lines too short to be prose or still holding markup go.
    """
    code = mwparserfromhell.parse(_body_without_headings(wikitext))
    for tag in code.filter_tags():
        if str(tag.tag).strip().lower() in DROPPED_TAGS:
            tag.contents = ""  # a tag without contents strips to nothing
    for link in code.filter_wikilinks():
        if _is_hidden_link(link):
            link.text = ""  # a link strips to its text
    lines = (_tidy(line) for line in code.strip_code().splitlines())
    return "\n".join(line for line in lines if _is_prose(line))


def _build_prose(wheel: Path) -> bytes:
    """The cleaned articles of the dump in the wheel, as deterministic UTF-8 JSON.

    Articles left with no prose (a disambiguation page is only a short list) are omitted.
    """
    with zipfile.ZipFile(wheel) as archive:
        xml = bz2.decompress(archive.read(WIKI_MEMBER))
    articles = []
    for title, wikitext in iter_articles(io.BytesIO(xml)):
        text = clean_wikitext(wikitext)
        if text:
            articles.append({"title": title, "text": text})
    document = {"source": f"{GENSIM.spec}:{WIKI_MEMBER}", "articles": articles}
    return (json.dumps(document, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


PROSE = Derived(
    relpath="prose/enwiki-shortened-clean.json",
    sha256="2c86fd6fbee2f6227ae1f8bb634dc133e4542048455564944b97f16bd07b0a4c",
    source=GENSIM,
    build=_build_prose,
)


def split_titles(titles: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """The held-out test titles: a seeded shuffle of the sorted titles, first ``round(n * f)``.

    Sorting first makes the result independent of the order the titles come in.
    """
    shuffled = sorted(titles)
    random.Random(seed).shuffle(shuffled)
    return set(shuffled[: max(1, round(len(shuffled) * test_fraction))])


def load_prose() -> DatasetDict:
    """Cleaned Wikipedia articles, one row (``title``, ``text``) each, split by article.

    ``test`` (10% of articles) is held out for the perplexity a report states and is seen by
    nothing else. ``validation`` (8% of the rest) is for choices made during training: the
    Trainer's evaluation, early stopping, the checkpoint kept. ``calibration`` (the remaining
    ~82%) feeds pruning scores, reconstruction and recovery training. The test titles are drawn
    first, so adding the validation split did not move a single test article. Paragraphs within
    ``text`` are separated by newlines. Reads only the cache.
    """
    document = json.loads(verify(PROSE.path, PROSE.sha256).read_text(encoding="utf-8"))
    return prose_splits(document["articles"])


def prose_splits(articles: list[dict]) -> DatasetDict:
    """``articles`` (``title``, ``text``; titles unique) split by title as ``load_prose`` splits the
    course's: the same fractions and seeds, so a user's documents get the same treatment."""
    titles = [a["title"] for a in articles]
    test = split_titles(titles, PROSE_TEST_FRACTION, PROSE_SEED)
    validation = split_titles([t for t in titles if t not in test], PROSE_VALIDATION_FRACTION, PROSE_VALIDATION_SEED)
    split_of = {t: "test" if t in test else "validation" if t in validation else "calibration" for t in titles}
    features = Features({"title": Value("string"), "text": Value("string")})
    return DatasetDict(
        {
            name: Dataset.from_list([a for a in articles if split_of[a["title"]] == name], features=features)
            for name in PROSE_SPLITS
        }
    )


def prose_text(split: str = "test", separator: str = "\n\n", corpus: DatasetDict | None = None) -> str:
    """One split's articles as one string, joined by ``separator`` (perplexity, calibration).

    ``corpus``: another set of documents in ``load_prose``'s splits (``user_data.text_corpus``)."""
    if split not in PROSE_SPLITS:
        raise SettingError(f"split={split!r} is unknown; choose one of {list(PROSE_SPLITS)}")
    return separator.join((load_prose() if corpus is None else corpus)[split]["text"])


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """``text`` tokenized without special tokens, as one LongTensor; kept in the cache for fast tokenizers.

    Calibration cuts a few windows out of the whole calibration split, which has to be tokenized
    first: half a million tokens, about 2 s on a CPU core, in every notebook, test and run that
    calibrates. The cache key is a hash of everything the result depends on (the tokenizer's full
    serialisation, its special-token splitting, the text), so another tokenizer or another text
    never reuses it; the file holds a hash of its ids, checked on every read.
    """
    def tokenize() -> torch.LongTensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)

    def digest(ids: torch.Tensor) -> str:
        return hashlib.sha256(ids.numpy().tobytes()).hexdigest()

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no serialisation to key the cache on
        return tokenize()
    key = hashlib.sha256(backend.to_str().encode())
    key.update(repr(getattr(tokenizer, "split_special_tokens", False)).encode() + b"\0" + text.encode())
    path = cache_dir() / "tokens" / f"{key.hexdigest()[:32]}.safetensors"
    if path.exists():
        with safe_open(path, "pt") as stored:
            ids, expected = stored.get_tensor("input_ids"), stored.metadata().get("sha256")
        if digest(ids) == expected:
            return ids
    ids = tokenize()
    atomic_write(path, save({"input_ids": ids}, metadata={"sha256": digest(ids)}))
    return ids


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int,
    n_tokens: int,
    seed: int = 0,
    split: str = "calibration",
    corpus: DatasetDict | None = None,
) -> torch.LongTensor:
    """``[n_samples, n_tokens]`` token ids: windows at seeded random offsets of a prose split.

    The split's articles are joined with the tokenizer's end-of-sequence token (or a blank line
    for tokenizers without one, such as BERT's), tokenized once without special tokens, and cut
    at offsets drawn by a generator seeded with ``seed``; so the same arguments give the same
    tensor on any machine. Windows may overlap, as in the usual GPTQ/Wanda calibration sampling.
    """
    if n_samples < 1:
        raise SettingError(f"n_samples must be at least 1, got n_samples={n_samples}")
    if n_tokens < 2:
        raise SettingError(f"n_tokens must be at least 2, got n_tokens={n_tokens}")
    ids = token_ids(tokenizer, prose_text(split, separator=tokenizer.eos_token or "\n\n", corpus=corpus))
    if len(ids) < n_tokens:
        raise SettingError(
            f"n_tokens={n_tokens} is more than the {len(ids)} tokens of the {split!r} split"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - n_tokens + 1, (n_samples,), generator=generator)
    return torch.stack([ids[start : start + n_tokens] for start in starts.tolist()])
