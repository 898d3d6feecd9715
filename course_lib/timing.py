"""Models timed side by side: prefill and decode, in interleaved rounds, median and spread.

A model timed once, when its stage happens, is timed on a machine whose state keeps changing
(caches, frequency, other processes): one demo run reported the pruned and the recovered model,
of identical shapes, 40% apart. Here every model runs once per round, the rounds rotate who goes
first, and each figure is the median over rounds, so slow moments fall on all models alike.

* prefill: one forward pass over 1 x ``seq`` tokens (ms). Compute-bound: its ideal speedup is
  the FLOP ratio.
* decode: tokens per second for ``new_tokens`` greedy steps at batch 1 with the KV cache, after
  an untimed prefill of the same prompt. Each step reads every weight once, so on a CPU it is
  bandwidth-bound: its ideal speedup is the weight-byte ratio.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

PREFILL_CALLS = 3  # forward passes timed per model and round


def round_robin(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: round r starts at model r (mod n), so each model goes first as often as any."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)] if names else []


def prompt(model: nn.Module, seq: int) -> torch.Tensor:
    """A fixed [1, seq] prompt of token ids (seeded), on the model's device."""
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued kernels (a GPU's work is asynchronous; a CPU's is not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one forward pass over ``ids``."""
    synchronize(ids.device)
    start = time.perf_counter()
    model(ids)
    synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy tokens per second over ``new_tokens`` steps with the KV cache, the prompt's prefill not timed."""
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(ids.device)
    return new_tokens / (time.perf_counter() - start)


def generates(model: nn.Module) -> bool:
    """Whether decode applies: a causal LM (``can_generate``), not an encoder."""
    return bool(getattr(model, "can_generate", lambda: False)())


def _median_and_spread(values: list[float]) -> tuple[float, float]:
    q1, median, q3 = torch.quantile(torch.tensor(values, dtype=torch.float64),
                                    torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return median, q3 - q1


def compare(models: dict[str, nn.Module], *, seq: int = 128, new_tokens: int = 32, rounds: int = 5,
            warmup: int = 1, prefill_calls: int = PREFILL_CALLS, progress: bool = False,
            timers: tuple[Callable, Callable] = (prefill_seconds, decode_tokens_per_second)) -> dict[str, dict]:
    """Time every model in ``models`` side by side; returns per name ``prefill_ms``, ``prefill_spread_ms``
    (median and interquartile range over rounds) and, for models that generate, ``decode_tokens_per_s`` and
    ``decode_spread`` (None for encoders).

    ``warmup`` untimed rounds come first (caches, lazy kernels). Each visit times ``prefill_calls``
    forward passes (cheap next to decoding, and single passes on a shared 2-core machine scatter by
    10%) and keeps their median. The per-round figures come back too (``prefill_rounds_ms``,
    ``decode_rounds``) for ``paired_speedup``. ``timers`` are the prefill and decode measurements,
    replaceable for tests.
    """
    for name, value in (("seq", seq), ("new_tokens", new_tokens), ("rounds", rounds),
                        ("prefill_calls", prefill_calls)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    prefill, decode = timers
    names = list(models)
    prompts = {name: prompt(model, seq) for name, model in models.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in names}
    schedule = round_robin(names, warmup + rounds)
    bar = tqdm(total=len(schedule) * len(names), desc="timing", disable=not progress)
    for index, order in enumerate(schedule):
        for name in order:
            model, ids = models[name], prompts[name]
            seconds = [prefill(model, ids) for _ in range(prefill_calls)]
            speed = decode(model, ids, new_tokens) if generates(model) else None
            if index >= warmup:
                samples[name]["prefill"].append(statistics.median(seconds) * 1e3)
                if speed is not None:
                    samples[name]["decode"].append(speed)
            bar.update()
    bar.close()
    results = {}
    for name in names:
        prefill_ms, prefill_spread = _median_and_spread(samples[name]["prefill"])
        decode_rate, decode_spread = (_median_and_spread(samples[name]["decode"]) if samples[name]["decode"]
                                      else (None, None))
        results[name] = {"prefill_ms": prefill_ms, "prefill_spread_ms": prefill_spread,
                         "decode_tokens_per_s": decode_rate, "decode_spread": decode_spread, "rounds": rounds,
                         "prefill_rounds_ms": samples[name]["prefill"],
                         "decode_rounds": samples[name]["decode"] or None}
    return results


def paired_speedup(baseline: list[float] | None, other: list[float] | None, *, higher_is_faster: bool) -> float | None:
    """Median over rounds of one round's speedup (``baseline`` and ``other``: per-round figures of ``compare``).

    Pairing each round with itself cancels what the machine did during that round: a slow moment
    slows both models of that round, and their ratio stays.
    """
    if not baseline or not other:
        return None
    ratios = [o / b if higher_is_faster else b / o for b, o in zip(baseline, other)]
    return statistics.median(ratios)
