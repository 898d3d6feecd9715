"""Plumbing shared by the importance modules: calibration batches, default losses, a no-trace session.

Calibration data comes in two shapes:

* a ``LongTensor [N, T]`` of token ids (what :func:`course_lib.data.calibration_batches` returns):
  cut into batches of ``batch_size`` rows, every token real (attention mask of ones);
* a list of dicts of tensors (``input_ids``, optional ``attention_mask``, ``token_type_ids``,
  ``labels``), typically tokenized encoder examples. A dict may hold one example (1-D
  ``input_ids``) or a batch (2-D); either way its rows are regrouped into batches of
  ``batch_size`` and right-padded to the longest row of each batch (``input_ids`` with the
  model's ``pad_token_id``, masks with 0, token-level labels with -100). Other keys are ignored.

Every scoring function runs inside :func:`scoring_session`, which is how the rule "scoring never
mutates the model" is kept: eval mode (no dropout, so results are deterministic),
``requires_grad`` switched on only for the parameters whose gradients are wanted, hooks
registered through it removed in ``finally``, and every flag restored afterwards even when the
scoring raises. Gradients are taken with :func:`torch.autograd.grad`, which never writes to
``param.grad``, so a model's accumulated gradients are untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SettingError

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
KNOWN_KEYS = MODEL_INPUT_KEYS + ("labels",)
MIN_TOKENS = 2


# ----------------------------------------------------------------------------- batches


def make_batches(calib, batch_size: int, pad_token_id: int | None = 0) -> list[Batch]:
    """Normalise ``calib`` into a list of batch dicts (always with an ``attention_mask``).

    Raises ``ValueError`` naming ``calib`` for empty data or sequences with fewer than 2 real
    tokens, and naming ``batch_size`` for a non-positive batch size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
    if calib is None:
        raise SettingError("calib is required for this method: pass a LongTensor [N, T] of token ids "
                           "or a list of dicts with input_ids / attention_mask")
    if isinstance(calib, torch.Tensor):
        return _tensor_batches(calib, batch_size)
    if isinstance(calib, Mapping):
        calib = [calib]
    if not isinstance(calib, Sequence) or isinstance(calib, (str, bytes)):
        raise SettingError(f"calib must be a LongTensor [N, T] or a list of dicts of tensors, got {type(calib).__name__}")
    return _dict_batches(calib, batch_size, 0 if pad_token_id is None else int(pad_token_id))


def _tensor_batches(ids: torch.Tensor, batch_size: int) -> list[Batch]:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SettingError(f"calib must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise SettingError(f"calib must be a LongTensor [N, T] (got shape {tuple(ids.shape)}); "
                           "for one sequence use calib.unsqueeze(0)")
    n, t = ids.shape
    if n == 0:
        raise SettingError("calib is empty (0 sequences); pass at least one calibration sequence")
    if t < MIN_TOKENS:
        raise SettingError(f"calib sequences are too short: {t} token(s) each, at least {MIN_TOKENS} are needed")
    ids = ids.long()
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)]


def _dict_batches(items: Sequence, batch_size: int, pad_token_id: int) -> list[Batch]:
    if len(items) == 0:
        raise SettingError("calib is empty (an empty list); pass at least one calibration example")
    rows: list[dict[str, torch.Tensor]] = []
    keys: set[str] | None = None
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise SettingError(f"calib[{i}] must be a dict with at least 'input_ids', got {type(item).__name__}")
        present = {k for k in KNOWN_KEYS if k in item and item[k] is not None}
        if keys is None:
            keys = present
        elif present != keys:
            raise SettingError(f"calib[{i}] has keys {sorted(present)} but calib[0] has {sorted(keys)}; "
                               "every dict needs the same keys")
        ids = torch.as_tensor(item["input_ids"])
        if ids.dim() not in (1, 2):
            raise SettingError(f"calib[{i}]['input_ids'] must be 1-D (one example) or 2-D (a batch), "
                               f"got shape {tuple(ids.shape)}")
        batched = ids.dim() == 2
        fields = {k: torch.as_tensor(item[k]) for k in present}
        fields.setdefault("attention_mask", torch.ones_like(ids))
        n_rows = ids.shape[0] if batched else 1
        for r in range(n_rows):
            row = {k: (v[r] if batched else v) for k, v in fields.items()}
            rows.append(row)
    if not rows:
        raise SettingError("calib is empty (its dicts hold 0 rows); pass at least one calibration example")
    for i, row in enumerate(rows):
        real = int(row["attention_mask"].sum())
        if row["input_ids"].numel() < MIN_TOKENS or real < MIN_TOKENS:
            raise SettingError(f"calib sequence {i} is too short: {real} non-padding token(s), "
                               f"at least {MIN_TOKENS} are needed")
    return [_collate(rows[s : s + batch_size], pad_token_id) for s in range(0, len(rows), batch_size)]


def _collate(rows: list[dict[str, torch.Tensor]], pad_token_id: int) -> Batch:
    length = max(int(r["input_ids"].shape[0]) for r in rows)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    batch: Batch = {}
    for key in rows[0]:
        values = []
        for r in rows:
            v = r[key]
            if v.dim() == 1:  # per-token field (scalar class labels stay as they are)
                v = torch.nn.functional.pad(v, (0, length - v.shape[0]), value=pad_values[key])
            values.append(v)
        batch[key] = torch.stack(values)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in batch:
            batch[key] = batch[key].long()
    return batch


def iterate(batches: list[Batch], model: nn.Module, progress: bool, desc: str) -> Iterator[Batch]:
    """The batches on the model's device, behind a ``tqdm.auto`` bar when ``progress``."""
    device = model_device(model)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
        yield {k: v.to(device) for k, v in batch.items()}


def per_block(items, progress: bool, desc: str):
    """``items`` (layers or blocks) behind a ``tqdm.auto`` bar when ``progress``."""
    return tqdm(items, desc=desc, disable=not progress, leave=False, unit="block")


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def pad_id(model: nn.Module) -> int:
    return getattr(model.config, "pad_token_id", None) or 0


def token_mask(batch: Batch) -> torch.Tensor:
    """``[B, T]`` bool: the real (non-padding) tokens."""
    return batch["attention_mask"].bool()


# ----------------------------------------------------------------------------- forward / loss


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False
    return name in params


def model_inputs(module: nn.Module, batch: Batch) -> dict:
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if _accepts(module, "use_cache"):
        inputs["use_cache"] = False  # no KV cache: it would hold every layer's keys and values
    return inputs


def forward_base(model: nn.Module, batch: Batch, **extra):
    """Run only the backbone (no LM / classification head): forward-only scores need no logits."""
    base = model.base_model
    return base(**model_inputs(base, batch), **extra)


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") and any(c.__name__.endswith("ForCausalLM") for c in type(model).__mro__)


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy with ``labels = input_ids`` (padding ignored)."""
    labels = batch["input_ids"].masked_fill(~token_mask(batch), -100)
    return model(**model_inputs(model, batch), labels=labels).loss


def labels_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss the model's head computes from the batch's ``labels``."""
    out = model(**model_inputs(model, batch), labels=batch["labels"])
    loss = getattr(out, "loss", None)
    if loss is None:
        raise SettingError(f"{type(model).__name__} returned no loss for the batch's labels; pass "
                           "loss_fn=lambda model, batch: <scalar tensor>")
    return loss


def resolve_loss_fn(model: nn.Module, loss_fn: LossFn | None, batches: list[Batch]) -> LossFn:
    """``loss_fn`` itself, else the LM loss for causal LMs, else the head's loss on ``labels``."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise SettingError(f"loss_fn must be callable (model, batch) -> scalar tensor, got {type(loss_fn).__name__}")
        return loss_fn
    if is_causal_lm(model):
        return causal_lm_loss
    has_head = model.base_model is not model
    if has_head and "labels" in batches[0]:
        return labels_loss
    reason = ("it is a bare backbone without a head" if not has_head
              else "it is not a causal LM and the calibration batches have no 'labels'")
    raise SettingError(
        f"cannot derive a loss for {type(model).__name__} ({reason}); pass "
        "loss_fn=lambda model, batch: <scalar tensor> (batch is a dict with input_ids, attention_mask, ...)"
    )


def as_scalar(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise SettingError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                           f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise SettingError("loss_fn returned a tensor that does not depend on the model's parameters "
                           "(computed under torch.no_grad()?)")
    return loss.reshape(())


# ----------------------------------------------------------------------------- session


@contextmanager
def scoring_session(model: nn.Module, trainable: Iterable[torch.Tensor] = ()):
    """Eval mode, ``requires_grad`` only on ``trainable``; yields a list to put hook handles in.

    On exit (normal or not) every handle is removed and every module's ``training`` flag and
    every parameter's ``requires_grad`` flag is restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks = _hook_snapshot(model)
    wanted = {id(t) for t in trainable}
    handles: list = []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        _restore_hooks(hooks)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


# Hook tables of nn.Module; the *_with_kwargs / *_always_called tables are keyed like the main ones.
_HOOK_TABLES = {
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_backward_hooks": (),
    "_backward_pre_hooks": (),
}
# transformers 5 installs its output-capturing hooks lazily, for good, the first time
# ``output_hidden_states=True`` is requested, and marks the model with this attribute.
_CAPTURE_FLAG = "_output_capturing_hooks_installed"


def _hook_snapshot(model: nn.Module) -> list:
    snap = []
    for m in model.modules():
        keys = {table: set(getattr(m, table, {}).keys()) for table in _HOOK_TABLES}
        snap.append((m, keys, getattr(m, _CAPTURE_FLAG, None) if hasattr(m, _CAPTURE_FLAG) else _MISSING))
    return snap


_MISSING = object()


def _restore_hooks(snap: list) -> None:
    """Remove every hook added since the snapshot (ours, and any transformers added for us)."""
    for m, keys, flag in snap:
        for table, companions in _HOOK_TABLES.items():
            hooks = getattr(m, table, None)
            if hooks is None:
                continue
            for key in [k for k in hooks if k not in keys[table]]:
                del hooks[key]
                for companion in companions:
                    getattr(m, companion, {}).pop(key, None)
        if flag is _MISSING:
            if _CAPTURE_FLAG in m.__dict__:
                delattr(m, _CAPTURE_FLAG)
        elif getattr(m, _CAPTURE_FLAG, _MISSING) is not flag:
            setattr(m, _CAPTURE_FLAG, flag)


def real_token_inputs(model: nn.Module, modules: Sequence[nn.Module], batches: list[Batch], progress: bool,
                      desc: str, fn: Callable[[int, torch.Tensor], None]) -> int:
    """One forward pass over ``batches``; ``fn(i, x)`` receives ``modules[i]``'s input on the real tokens.

    ``x`` is ``[real tokens, features]`` (padding dropped). The hook every activation statistic
    uses (head output norms at ``o_proj``, neuron activations at ``down_proj``), inside a
    ``scoring_session``. Returns the number of real tokens seen.
    """
    mask: list[torch.Tensor] = []

    def make_hook(i):
        def hook(module, args):
            fn(i, args[0][mask[0]])

        return hook

    n_tokens = 0
    with scoring_session(model) as handles, torch.no_grad():
        handles.extend(m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules))
        for batch in iterate(batches, model, progress, desc):
            mask[:] = [token_mask(batch)]
            n_tokens += int(mask[0].sum())
            forward_base(model, batch)
    return n_tokens


def first_tensor(output) -> torch.Tensor:
    """A block's hidden states from its output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]
