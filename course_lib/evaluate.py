"""Quality measures shared by the notebooks, the importance oracle and the pipeline."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import SettingError


def count_parameters(model: nn.Module) -> int:
    """Weights the model computes with, counted once each (tied embeddings are one tensor).

    Quantized linears (AWQ's, ``lowbit``'s) keep their integer weights and bias as buffers, so
    ``parameters()`` misses both: they count as the ``in_features x out_features`` (and bias) they
    stand for, which keeps a quantized model's count equal to its fp32 twin's.
    """
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    packed = sum(m.in_features * m.out_features + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                 for m in model.modules() if hasattr(m, "qweight"))
    return unique + packed


def storage_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory: parameters and buffers, each tensor once.

    Quantized weights count at their stored width: AWQ's packed int32 ``qweight`` with its fp16
    scales and zeros, ``lowbit``'s uint8 / int8 buffers with their bf16 scales, torchao's tensor
    subclasses through the inner tensors they flatten to (their ``element_size()`` reports the
    float they stand for). Simulated quantization (RTN here) stays fp32.
    """
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(_stored_bytes(t) for t in tensors.values())


def _stored_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (torchao): count what it holds
        names, _ = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


# Windows of one stream scored in one forward pass, up to this many and this many logits (256 MiB of
# fp32): SmolLM2's 256-token windows go 5 at a time, 2,048-token ones alone.
MAX_WINDOWS = 8
LOGIT_ELEMENTS = 2**26


def perplexity(model: nn.Module, ids: torch.Tensor, *, context: int = 256, stride: int | None = None,
               progress: bool = False) -> float:
    """Sliding-window perplexity of a causal LM over one long token stream ``ids`` [T].

    Each window of ``context`` tokens scores only the tokens not scored by the previous window,
    so every token after the first is predicted once, with up to ``context - stride`` tokens of
    left context (stride = context gives disjoint windows, the cheapest and most pessimistic).
    """
    return language_model_scores(model, ids, context=context, stride=stride, progress=progress)["perplexity"]


@torch.no_grad()
def language_model_scores(model: nn.Module, ids: torch.Tensor, *, context: int = 256, stride: int | None = None,
                          progress: bool = False) -> dict[str, float]:
    """``perplexity`` and ``accuracy`` (share of tokens whose greedy prediction is right) in one pass,
    over the same windows as :func:`perplexity`.

    Next-token accuracy is the causal LM's counterpart of a classifier's accuracy: "share retained"
    after pruning reads like the papers' accuracy retained, where a perplexity ratio does not.

    Full windows go through the model several at a time, and a model whose ``forward`` takes
    ``logits_to_keep`` (Hugging Face's causal LMs) computes logits only from the first position
    a window scores: the same numbers as one window at a time with every logit, in about a
    quarter less time for SmolLM2 on 2,048 tokens (256-token windows, stride 192, 2 CPU cores).
    """
    ids = torch.as_tensor(ids).reshape(-1)
    stride = stride or context
    if context < 2:
        raise SettingError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise SettingError(f"stride must be in [1, context={context}], got {stride}")
    if ids.numel() < 2:
        raise SettingError(f"ids must hold at least 2 tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    windows, scored_until = [], 0  # (start, end, positions of the window already scored by the one before)
    for start in range(0, ids.numel() - 1, stride):
        end = min(start + context, ids.numel())
        windows.append((start, end, max(scored_until, start + 1) - start - 1))
        scored_until = end
        if end == ids.numel():
            break
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    per_batch = max(1, min(MAX_WINDOWS, LOGIT_ELEMENTS // (context * vocab)))
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    short = windows[-1][1] - windows[-1][0] < context  # the stream's last window may be shorter: it goes alone
    full = windows[:-1] if short else windows
    batches = [full[i:i + per_batch] for i in range(0, len(full), per_batch)] + ([windows[-1:]] if short else [])
    total_nll, total_tokens, correct = 0.0, 0, 0
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        x = torch.stack([ids[start:end] for start, end, _ in batch]).to(device)
        skip = min(new for _, _, new in batch)  # no window needs logits before this position
        logits = (model(x, logits_to_keep=x.shape[1] - skip) if keeps_logits else model(x)).logits
        offset = x.shape[1] - logits.shape[1]
        for row, (_, _, new) in enumerate(batch):
            predicted, targets = logits[row, new - offset:-1].float(), x[row, new + 1:]
            total_nll += nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
            correct += int((predicted.argmax(-1) == targets).sum())
            total_tokens += targets.numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "accuracy": correct / total_tokens}


def repeated_ngram_share(tokens: list[int] | torch.Tensor, n: int = 3) -> float:
    """Share of n-grams that already occurred earlier in the sequence (0 = none repeated).

    Pruned decoders often fall into loops ("the the the", a sentence over and over); this number
    catches them where perplexity on reference text does not.
    """
    tokens = [int(t) for t in torch.as_tensor(tokens).reshape(-1)]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


@torch.no_grad()
def greedy_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[dict]:
    """Greedy continuations with their repetition share, one dict per prompt."""
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        samples.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
                        "repeated_3gram_share": repeated_ngram_share(new, 3)})
    return samples


def _dummy_ids(model: nn.Module, batch: int, seq: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def forward_flops(model: nn.Module, batch: int = 1, seq: int = 128) -> int:
    """FLOPs of one forward pass on a [batch, seq] input, counted by torch's FlopCounterMode.

    Counted from the operations actually dispatched, so it follows every pruned shape without a
    hand-written formula (matmuls and attention; elementwise work is not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(_dummy_ids(model, batch, seq))
    return int(counter.get_total_flops())


def _timed(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of ``fn`` after warm-up; on a GPU, waits for its kernels each time."""
    import time

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    t = torch.tensor(times) * 1e3
    q1, med, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"median_ms": med, "iqr_ms": q3 - q1, "min_ms": t.min().item(), "runs": len(times)}


@torch.no_grad()
def latency(model: nn.Module, *, batch: int = 1, seq: int = 128, mode: str = "forward", warmup: int = 2,
            repeats: int = 7, threads: int | None = None) -> dict[str, float]:
    """Wall-clock latency: warm-up, then median and spread (IQR) of ``repeats`` runs, in ms.

    mode="forward": one forward pass over [batch, seq] (prefill). mode="decode": one new token
    per sequence with a KV cache of ``seq`` tokens (the step that dominates generation).
    Machines are noisy: compare models by the ratio of medians measured in the same run.
    """
    if mode not in ("forward", "decode"):
        raise SettingError(f"mode must be one of ['decode', 'forward'], got {mode!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        ids = _dummy_ids(model, batch, seq)
        if mode == "forward":
            return _summary(_timed(lambda: model(ids), warmup, repeats, ids.device))
        past = model(ids, use_cache=True).past_key_values
        step = ids[:, -1:]
        return _summary(_timed(lambda: model(step, past_key_values=past, use_cache=True), warmup, repeats, ids.device))
    finally:
        torch.set_num_threads(previous_threads)


def accuracy(predictions, labels) -> float:
    """Share of predictions equal to their labels."""
    predictions, labels = torch.as_tensor(predictions).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if predictions.shape != labels.shape or predictions.numel() == 0:
        raise SettingError(f"predictions and labels must be non-empty and equal in length, "
                           f"got {predictions.numel()} and {labels.numel()}")
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, tokenizer, texts: list[str], labels, *, batch_size: int = 64,
                        max_length: int = 64) -> float:
    """Accuracy of a sequence classifier on raw texts (argmax of the logits).

    Batches are formed from texts of similar length (sorted by token count), so a batch pads to
    little more than its own texts: on the course's review sentences that is about half the
    tokens of batching in order, with the same predictions (padding is masked).
    """
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    features = [{key: values[i] for key, values in encoded.items()} for i in range(len(encoded["input_ids"]))]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    predictions = torch.empty(len(features), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad([features[i] for i in rows], return_tensors="pt").to(device)
        predictions[rows] = model(**batch).logits.argmax(-1).cpu()
    return accuracy(predictions, labels)
