"""Models timed side by side: prefill and decode, interleaved pass by pass and token by token.

A model timed once, when its stage happens, is timed on a machine whose state keeps changing
(caches, frequency, other processes): one demo run reported the pruned and the recovered model,
of identical shapes, 40% apart. On a shared 2-core machine the same forward pass drifts from
280 to 450 ms within seconds, so even models timed a few seconds apart are not compared fairly.
Here the models take turns at the finest step there is: one prefill pass each, in a rotating
order, then one decode token each, every model holding its own KV cache. A slow moment then falls
on neighbouring samples of every model, and a speedup is the median of the ratios of those
neighbours (``paired_speedup``).

* prefill: one forward pass over 1 x ``seq`` tokens (ms). Compute-bound: its ideal speedup is
  the FLOP ratio.
* decode: one greedy step at batch 1 with the KV cache, after an untimed prefill of the same
  prompt; tokens per second = 1000 / the median step in ms. Each step reads every weight once,
  so on a CPU it is bandwidth-bound: its ideal speedup is the weight-byte ratio.

``decode_breakdown`` says how far from that ideal a model can get: it times each model beside a
``hollow`` copy whose linear layers return zeros, so the step splits into the linear layers and
everything else (norms, rotary, attention, the KV cache, Python), which no weight format shrinks.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from . import lowbit
from .errors import SettingError

PREFILL_CALLS = 3  # forward passes timed per model and round


def round_robin(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: round r starts at model r (mod n), so each model goes first as often as any."""
    if rounds < 1:
        raise SettingError(f"rounds must be >= 1, got {rounds}")
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)] if names else []


def prompt(model: nn.Module, seq: int, batch: int = 1) -> torch.Tensor:
    """A fixed [batch, seq] prompt of token ids (seeded), on the model's device."""
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


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


def decode_steps(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Iterator[float]:
    """Seconds of each of ``new_tokens`` greedy steps with the KV cache, one per ``next``; the prompt's
    prefill (run at the first ``next``) is not timed. A generator, so that ``compare`` can step
    several models in turn."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        synchronize(ids.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        synchronize(ids.device)
        yield time.perf_counter() - start


def generates(model: nn.Module) -> bool:
    """Whether decode applies: a causal LM (``can_generate``), not an encoder."""
    return bool(getattr(model, "can_generate", lambda: False)())


def _median_and_spread(values: list[float]) -> tuple[float, float]:
    q1, median, q3 = torch.quantile(torch.tensor(values, dtype=torch.float64),
                                    torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return median, q3 - q1


def compare(models: dict[str, nn.Module], *, seq: int = 128, new_tokens: int = 32, rounds: int = 5,
            warmup: int = 1, batch: int = 1, prefill_calls: int = PREFILL_CALLS, progress: bool = False,
            timers: tuple[Callable, Callable] = (prefill_seconds, decode_steps)) -> dict[str, dict]:
    """Time every model in ``models`` side by side on ``batch`` x ``seq``-token prompts; returns per name
    ``prefill_ms``, ``prefill_spread_ms`` (median and interquartile range over all timed passes) and, for models that generate,
    ``decode_tokens_per_s`` and ``decode_spread`` (1000 / the median step in ms, and the IQR of the
    steps' rates; None for encoders, and for every model with ``new_tokens=0``: prefill only, without
    the untimed prompt pass that each generation starts with).

    A round is ``prefill_calls`` passes of each model, taking turns pass by pass, then one
    generation of ``new_tokens`` tokens per model, taking turns token by token; the rounds rotate
    who goes first, and ``warmup`` untimed rounds come first (caches, lazy kernels). Every timed
    sample comes back in the order taken (``prefill_samples_ms``, ``decode_step_ms``), so sample
    i of one model sits next to sample i of another, for ``paired_speedup``. ``timers`` are the
    prefill pass (seconds) and the decode steps (a generator of seconds per step, as
    ``decode_steps``), replaceable for tests.
    """
    for name, value in (("seq", seq), ("rounds", rounds), ("prefill_calls", prefill_calls), ("batch", batch)):
        if value < 1:
            raise SettingError(f"{name} must be >= 1, got {value}")
    for name, value in (("new_tokens", new_tokens), ("warmup", warmup)):
        if value < 0:
            raise SettingError(f"{name} must be >= 0, got {value}")
    prefill, decode = timers
    names = list(models)
    prompts = {name: prompt(model, seq, batch) for name, model in models.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in names}
    schedule = round_robin(names, warmup + rounds)
    bar = tqdm(total=len(schedule) * (prefill_calls + new_tokens), desc="timing", disable=not progress)
    for index, order in enumerate(schedule):
        timed = index >= warmup
        for _ in range(prefill_calls):
            for name in order:
                seconds = prefill(models[name], prompts[name])
                if timed:
                    samples[name]["prefill"].append(seconds * 1e3)
            bar.update()
        steppers = {name: decode(models[name], prompts[name], new_tokens) for name in order if generates(models[name])}
        for _ in range(new_tokens):
            for name, steps in steppers.items():
                seconds = next(steps)
                if timed:
                    samples[name]["decode"].append(seconds * 1e3)
            bar.update()
    bar.close()
    results = {}
    for name in names:
        prefill_ms, prefill_spread = _median_and_spread(samples[name]["prefill"])
        steps = samples[name]["decode"]
        decode_rate, decode_spread = ((1e3 / statistics.median(steps), _median_and_spread([1e3 / s for s in steps])[1])
                                      if steps else (None, None))
        results[name] = {"prefill_ms": prefill_ms, "prefill_spread_ms": prefill_spread,
                         "decode_tokens_per_s": decode_rate, "decode_spread": decode_spread, "rounds": rounds,
                         "prefill_samples_ms": samples[name]["prefill"], "decode_step_ms": steps or None}
    return results


def paired_speedup(baseline: list[float] | None, other: list[float] | None) -> float | None:
    """The median over samples of ``baseline[i] / other[i]``: per-sample times (ms) of two models from
    ``compare``, sample i of each taken one after the other.

    Pairing neighbours cancels what the machine did at that moment: a slow second slows both
    samples of a pair, and their ratio stays.
    """
    if not baseline or not other:
        return None
    if len(baseline) != len(other):
        raise SettingError(f"paired samples must be as many on both sides, got {len(baseline)} and {len(other)}")
    return statistics.median(b / o for b, o in zip(baseline, other))


class Hollow(nn.Module):
    """Stands in for a linear layer: zeros of its output shape and dtype, no arithmetic, no weights read."""

    def __init__(self, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.dtype = out_features, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, dtype={self.dtype}"


LINEARS = (nn.Linear, *lowbit.LAYERS.values())  # what ``hollow`` replaces: fp32 / bf16 and the low-bit layers


def hollow(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers (``LINEARS``) are ``Hollow``: the same step without its matmuls."""
    model = copy.deepcopy(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LINEARS)]:
        parent, _, attr = name.rpartition(".")
        dtype = module.weight.dtype if isinstance(module, nn.Linear) else lowbit.COMPUTE_DTYPE
        setattr(model.get_submodule(parent), attr, Hollow(module.out_features, dtype))
    return model


def decode_breakdown(models: dict[str, nn.Module], **settings) -> dict[str, dict[str, float]]:
    """Per model, the decode step in ms split into ``linear_ms`` and ``rest_ms``, with ``step_ms`` and
    ``tokens_per_s``; ``settings`` go to ``compare``.

    Every model is timed side by side with its ``hollow`` copy: the copy's step is the rest, the
    difference the linear layers. A low-bit format shrinks only the first part, so the decode
    speedup of model b over a is capped near ``linear_ms[a] / linear_ms[b]`` and falls towards 1 as
    the rest grows.
    """
    generating = [name for name, model in models.items() if generates(model)]
    if not generating:
        raise SettingError(f"decode_breakdown needs causal LMs; none of {sorted(models)} generates")
    timed = {**{name: models[name] for name in generating}, **{f"{name} (hollow)": hollow(models[name]) for name in generating}}
    results = compare(timed, **settings)
    breakdown = {}
    for name in generating:
        step, rest = (1e3 / results[key]["decode_tokens_per_s"] for key in (name, f"{name} (hollow)"))
        breakdown[name] = {"step_ms": step, "linear_ms": step - rest, "rest_ms": rest,
                           "tokens_per_s": results[name]["decode_tokens_per_s"], "decode_step_ms": results[name]["decode_step_ms"]}
    return breakdown
