"""Notebook 10's capstone: a saved SmolLM2 that decodes faster on this CPU at a stated quality cost.

The learner hands in a directory. ``check_capstone`` measures it the way the course measures
everything, against the dense fp32 model in the same process: perplexity on the profile's held-out
test tokens (text no calibration or training in the course sees), decode speed taking turns token
by token (``timing.compare``), parameters from the saved architecture, widths from its config, and
a reload in a fresh Python process that must give the very logits of the first load. The report
lists every criterion with what was measured and what was required, its points, and what is still
missing, so a failed capstone says how to fix it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import CheckFailed

PROBE = "The history of the city begins in the early middle ages, when"


@dataclass(frozen=True)
class Target:
    """What the capstone asks for, against the dense fp32 model measured side by side."""

    decode_speedup: float = 1.3  # decode tokens/s at batch 1, median ratio of neighbouring steps
    perplexity_ratio: float = 1.5  # at most this many times the dense perplexity
    removed_share: float = 0.10  # at least this share of the decoder-layer parameters removed
    multiple: int = 64  # every kept MLP and attention width a multiple of this


@dataclass(frozen=True)
class Criterion:
    name: str
    points: int
    passed: bool
    measured: str
    required: str


@dataclass
class CapstoneReport:
    criteria: list[Criterion] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # the raw measurements behind the criteria

    @property
    def points(self) -> int:
        return sum(c.points for c in self.criteria if c.passed)

    @property
    def total(self) -> int:
        return sum(c.points for c in self.criteria)

    @property
    def missing(self) -> list[str]:
        return [f"{c.name}: measured {c.measured}, required {c.required}" for c in self.criteria if not c.passed]

    def __str__(self) -> str:
        lines = [f"{'criterion':34s} {'measured':>22s}  {'required':>14s}  points"]
        lines += [f"{c.name:34s} {c.measured:>22s}  {c.required:>14s}  {c.points if c.passed else 0:2d}/{c.points}"
                  for c in self.criteria]
        lines.append(f"{'total':34s} {'':>22s}  {'':>14s}  {self.points}/{self.total}")
        return "\n".join(lines)

    def assert_passed(self) -> None:
        if self.missing:
            raise CheckFailed("the capstone is not there yet:\n  " + "\n  ".join(self.missing))


def judge(measured: dict, target: Target = Target()) -> CapstoneReport:
    """The criteria for ``measured`` (keys: ``reloads``, ``unaligned``, ``removed_share``,
    ``perplexity_ratio``, ``decode_speedup``): pure arithmetic, so the rules are tested apart from
    the minutes of measuring."""
    unaligned = measured["unaligned"]
    return CapstoneReport([
        Criterion("reloads in a fresh process", 10, measured["reloads"] is True,
                  "identical logits" if measured["reloads"] is True else str(measured["reloads"]), "identical logits"),
        Criterion(f"widths multiples of {target.multiple}", 10, not unaligned,
                  "all" if not unaligned else ", ".join(unaligned[:3]) + (" ..." if len(unaligned) > 3 else ""),
                  "all"),
        Criterion("decoder-layer parameters removed", 10, measured["removed_share"] >= target.removed_share - 1e-9,
                  f"{measured['removed_share']:.1%}", f">= {target.removed_share:.0%}"),
        Criterion("perplexity / dense", 30, measured["perplexity_ratio"] <= target.perplexity_ratio,
                  f"{measured['perplexity_ratio']:.2f}x", f"<= {target.perplexity_ratio:.2f}x"),
        Criterion("decode speed / dense fp32", 40, measured["decode_speedup"] >= target.decode_speedup,
                  f"{measured['decode_speedup']:.2f}x", f">= {target.decode_speedup:.2f}x"),
    ])


def load_candidate(directory: str | Path) -> nn.Module:
    """A saved model as its format loads: ``lowbit.load`` for the course's INT4 / INT8 / bf16, else the Auto class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import lowbit

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} holds no config.json: save the model there with save_pretrained "
                                "(fp32) or course_lib.lowbit.save (int4 / int8 / bf16)")
    quant = getattr(AutoConfig.from_pretrained(directory), "quantization_config", None) or {}
    if quant.get("quant_method") == lowbit.QUANT_METHOD:
        return lowbit.load(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def architecture(directory: str | Path) -> nn.Module:
    """The saved model's architecture on the meta device (no weights): its widths and parameter count."""
    from transformers import AutoConfig

    from ..pruned_modeling import auto_class_for

    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # describes the weights' format, not the architecture
    with torch.device("meta"):
        return auto_class_for(config).from_config(config)


def unaligned_widths(model: nn.Module, multiple: int) -> list[str]:
    """Each layer's MLP width and query / KV widths that are not multiples of ``multiple``, named."""
    from ..pruned_modeling import adapter_for

    adapter = adapter_for(model)
    head_dim = adapter.head_dim(model)
    found = []
    for i, block in enumerate(adapter.blocks(model)):
        widths = {"MLP": adapter.intermediate_size(block), "query": adapter.num_heads(block) * head_dim,
                  "KV": adapter.num_kv_heads(block) * head_dim}
        found += [f"layer {i} {kind} {width}" for kind, width in widths.items() if width % multiple]
    return found


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def fresh_reload_matches(directory: str | Path, ids: torch.Tensor, expected: torch.Tensor) -> bool | str:
    """Load ``directory`` in a new Python process, run it on ``ids`` and compare its logits with
    ``expected``: True, or what went wrong."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as scratch:
        given, out = Path(scratch) / "ids.safetensors", Path(scratch) / "logits.safetensors"
        save_file({"ids": ids.contiguous()}, given)
        script = ("import sys; from safetensors.torch import load_file, save_file; "
                  "from course_lib.exercises.capstone import load_candidate, _logits; "
                  "logits = _logits(load_candidate(sys.argv[1]), load_file(sys.argv[2])['ids']); "
                  "save_file({'logits': logits.contiguous()}, sys.argv[3])")
        done = subprocess.run([sys.executable, "-c", script, str(directory), str(given), str(out)],
                              capture_output=True, text=True)
        if done.returncode:
            return "did not load: " + (done.stderr.strip().splitlines() or ["(no message)"])[-1][:120]
        return True if torch.equal(load_file(out)["logits"], expected) else "different logits"


def check_capstone(directory: str | Path, target: Target = Target(), *, rounds: int = 3,
                   profile: str | None = None) -> CapstoneReport:
    """Measure the model saved in ``directory`` against the dense SmolLM2 of ``profile`` and judge it."""
    from .. import evaluate, timing
    from ..budget import block_parameters
    from ..data import prose_text
    from ..profiles import get_profile
    from ..zoo import load_decoder

    chosen = get_profile(profile)
    candidate = load_candidate(directory)
    dense, tokenizer = load_decoder(chosen.decoder)
    shape = architecture(directory)
    held_out = torch.tensor(tokenizer(prose_text("test"), verbose=False)["input_ids"])[:chosen.ppl_max_tokens or None]
    ppl = {name: evaluate.perplexity(model, held_out, context=chosen.ppl_context, stride=chosen.ppl_stride)
           for name, model in (("dense", dense), ("candidate", candidate))}
    speed = timing.compare({"dense": dense, "candidate": candidate}, seq=64, new_tokens=16, rounds=rounds,
                           prefill_calls=1)
    probe = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    measured = {
        "reloads": fresh_reload_matches(directory, probe, _logits(candidate, probe)),
        "unaligned": unaligned_widths(shape, target.multiple),
        "removed_share": 1 - block_parameters(shape) / block_parameters(dense),
        "perplexity_ratio": ppl["candidate"] / ppl["dense"],
        "decode_speedup": timing.paired_speedup(speed["dense"]["decode_step_ms"], speed["candidate"]["decode_step_ms"]),
    }
    report = judge(measured, target)
    report.details = {"perplexity": ppl,
                      "decode_tokens_per_s": {name: r["decode_tokens_per_s"] for name, r in speed.items()}}
    return report
