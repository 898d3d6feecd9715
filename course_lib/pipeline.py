"""The whole pipeline: score -> select -> surgery -> recover (repeat for iterative) -> quantize.

``run(config, out_dir)`` records every stage in a history (parameters, weight bytes, FLOPs, quality,
and at the end of the run prefill and decode speed, every stage's model timed side by side in
interleaved rounds by ``course_lib.timing``) and writes the report folder: ``report.md``,
``history.json``, ``plan.json``, PNG plots, the saved pruned model (safetensors, reloadable with
``from_pretrained``) and each quantized model.

Two ways to say how much to remove:

* ``param_fraction`` (the default path, and ``make demo``'s): a share of the block parameters;
  ``budget.plan_for_budget`` chooses the mix of layers, heads and neurons from measured
  sensitivity;
* the explicit ``layers`` / ``head_fraction`` / ``neuron_fraction`` (the notebooks' path): each
  kind is scored and selected in turn, with scores divided by their layer's median first
  (``selection.layer_normalised``) so that no global ranking compares raw scores of different
  scales.

Either way the consumers of removed heads and neurons are refitted by least squares
(``reconstruction``) unless ``reconstruct=False``.

Before any work, ``validate(config, model_config)`` checks every setting against the model's
config (no weights loaded): counts, protections, GQA and alignment feasibility, the quantizers'
widths and group sizes, sequence lengths. It raises ``SettingError`` naming the setting.

One-shot is ``steps=1``; iterative pruning splits the same total budget over ``steps`` rounds,
scoring the *current* model each round and recovering after each, so later choices see the
effect of earlier removals. The recovery tokens are split over the rounds too: iterative and
one-shot runs get the same training compute, so comparing them is fair.

Recovery (``course_lib.recovery``) fine-tunes all weights but the embeddings by default: at
equal tokens that beat LoRA and distillation from the unpruned model on the course's decoder
(``benchmarks/recovery_recipes.py``); both are a setting away. Under
``accelerate launch`` with several processes every process prunes the same way (same seeds,
same data), recovery runs data-parallel, and rank 0 alone saves, quantizes and reports.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .errors import CourseError, SettingError
from . import importance, lowbit, onnx_decoder, selection, timing
from .budget import block_parameters, check_budget, plan_for_budget
from .evaluate import count_parameters, forward_flops, storage_bytes
from .paths import staged_directory
from .plan import PruningPlan
from .profiles import get_profile
from .pruned_modeling import adapter_for, auto_class_for
from .quantize import AWQ_SEARCHED, check_formats
from .reconstruction import prune_and_reconstruct
from .recovery import RecoveryConfig, fine_tune
from .surgery import apply_plan
from .tasks import task_for
from .user_data import DataFiles

QUANTIZERS = ("int4", "awq", "int8", "bf16", "rtn")  # course_lib.quantize says what each is for
INT4 = ("int4", "awq", "rtn")  # weight-only 4-bit on a group grid: widths must divide into groups
# What each kind of the explicit path removes, and the setting that asks for it (named in errors).
KIND_SETTINGS = {"layers": "layers", "heads": "head_fraction", "neurons": "neuron_fraction"}


@dataclass(frozen=True)
class PruningConfig:
    """Everything a run needs; validated on construction so a bad value fails before any work."""

    model: str = "smollm2-135m"
    profile: str = "ci"
    param_fraction: float = 0.0  # > 0: remove this share of the block parameters, the planner picks the mix
    reconstruct: bool = True  # refit the projections that consumed removed heads and neurons
    layers: int = 0  # blocks removed in total
    head_fraction: float = 0.0  # of query heads (or KV groups with granularity="kv_group")
    head_method: str = "taylor"
    granularity: str = "query"
    neuron_fraction: float = 0.0
    neuron_method: str = "wanda"
    layer_metric: str = "bi"
    protect_first: int = 1
    protect_last: int = 1
    multiple: int = 64  # hardware alignment of kept widths; 1 turns it off
    steps: int = 1  # 1 = one-shot; > 1 = iterative, the same recovery tokens split over the rounds
    recovery_tokens: int | None = None  # training tokens in all; None = the profile's budget; 0 = no recovery
    learning_rate: float | None = None  # recovery; None = the task's measured best (decoder 3e-4, encoder 5e-5)
    lora_rank: int = 0
    distill_alpha: float = 0.0  # > 0: distil from the unpruned model with this weight (0 = plain fine-tuning)
    hidden_weight: float = 0.0  # weight of the hidden-state distillation loss
    temperature: float = 2.0
    quantize: tuple[str, ...] = ("int4", "awq", "int8", "bf16", "rtn")
    group_size: int = 64  # INT4 group size; selection aligns widths to it when an INT4 format is asked for
    latency_seq: int = 128  # prefill: 1 x this many tokens; decode starts from a prompt this long
    decode_tokens: int = 32  # new tokens timed per decode run
    timing_rounds: int = 7  # interleaved rounds; each figure is the median over them
    prefill_passes: int = 12  # prefill passes per model and round: two demo runs with 3 differed by up to 8% on a
    # shared 2-core machine (a median of 21 paired ratios has a standard error of ~2%); 12 halve that error
    seed: int = 0
    # the user's data (course_lib.user_data); all empty: the course's Wikipedia articles / movie-review snippets
    text_file: str = ""  # a causal LM's documents: plain text (blank-line separated) or a CSV / JSONL / Parquet table
    train_file: str = ""  # a classifier's labelled texts (CSV / JSONL / Parquet)
    validation_file: str = ""  # optional; else held out of train_file
    test_file: str = ""  # optional; else held out of train_file
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self) -> None:
        get_profile(self.profile)
        self.data_files()  # checked now
        for name in ("param_fraction", "head_fraction", "neuron_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise SettingError(f"{name} must be in [0, 1), got {value}", setting=name)
        if self.param_fraction and (self.layers or self.head_fraction or self.neuron_fraction):
            raise SettingError("give either param_fraction (the planner picks the mix) or layers / head_fraction / "
                               f"neuron_fraction, not both (got param_fraction={self.param_fraction}, layers="
                               f"{self.layers}, head_fraction={self.head_fraction}, "
                               f"neuron_fraction={self.neuron_fraction})")
        choices = {"head_method": importance.HEAD_METHODS, "neuron_method": importance.NEURON_METHODS,
                   "granularity": ("query", "kv_group"), "layer_metric": ("bi", "angular")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingError(f"{name}={getattr(self, name)!r} is unknown; allowed: {', '.join(allowed)}",
                                   setting=name)
        unknown = [q for q in self.quantize if q not in QUANTIZERS]
        if unknown:
            raise SettingError(f"quantize={unknown} is unknown; allowed: {', '.join(QUANTIZERS)}", setting="quantize")
        minimums = {"layers": 0, "protect_first": 0, "protect_last": 0, "multiple": 1, "steps": 1,
                    "group_size": 1, "latency_seq": 2, "decode_tokens": 1, "timing_rounds": 1,
                    "prefill_passes": 1}
        for name, low in minimums.items():
            if getattr(self, name) < low:
                raise SettingError(f"{name} must be >= {low}, got {getattr(self, name)}", setting=name)
        if self.recovery_tokens is not None and self.recovery_tokens < 0:
            raise SettingError(f"recovery_tokens must be >= 0 (0 = no recovery) or None (the profile's budget), "
                               f"got {self.recovery_tokens}", setting="recovery_tokens")
        if self.recovery_tokens is not None and 0 < self.recovery_tokens < self.steps:
            raise SettingError(f"recovery_tokens={self.recovery_tokens} cannot be split over steps={self.steps} rounds",
                               setting="recovery_tokens")
        self.recovery_config(tokens=max(self.recovery_tokens or 1, 1), batch_size=1, learning_rate=1.0)  # checked now

    def data_files(self) -> DataFiles:
        return DataFiles(**{f.name: getattr(self, f.name) for f in fields(DataFiles)})

    def recovery_config(self, tokens: int, batch_size: int, learning_rate: float) -> RecoveryConfig:
        """One round's recipe: this config's learning rate (else the task's), LoRA rank and distillation weights."""
        rate = learning_rate if self.learning_rate is None else self.learning_rate
        return RecoveryConfig(tokens=tokens, batch_size=batch_size, learning_rate=rate,
                              lora_rank=self.lora_rank, distill_alpha=self.distill_alpha,
                              hidden_weight=self.hidden_weight, temperature=self.temperature,
                              freeze_embeddings=True, seed=self.seed)


@dataclass
class Stage:
    """One row of the report. The speed fields are filled at the end of the run, all stages timed
    together (``timing.compare``); None where a stage is not timed (decode for an encoder; AWQ's
    checkpoint on a CPU, which has no kernel for it)."""

    stage: str
    params: int
    weight_bytes: int
    flops: int
    quality: float
    prefill_ms: float | None = None
    prefill_spread_ms: float | None = None
    decode_tokens_per_s: float | None = None
    decode_spread: float | None = None
    prefill_samples_ms: list[float] | None = None  # every timed pass and step, for speedups paired by sample
    decode_step_ms: list[float] | None = None
    extra: dict = field(default_factory=dict)


def split_budget(total: int, steps: int) -> list[int]:
    """``total`` structures spread over ``steps`` rounds as evenly as integers allow."""
    return [total * (i + 1) // steps - total * i // steps for i in range(steps)]


def _measure(name: str, model: nn.Module, task, config: PruningConfig, models: dict, flops: int | None = None,
             timed: bool = True, changes_later: bool = True, **extra) -> Stage:
    """The stage's size and quality now; its model goes into ``models`` to be timed with the others
    (a copy, if the run goes on changing it in place)."""
    if timed:
        models[name] = copy.deepcopy(model) if changes_later else model
    return Stage(stage=name, params=count_parameters(model), weight_bytes=storage_bytes(model),
                 flops=forward_flops(model, 1, config.latency_seq) if flops is None else flops,
                 quality=task.quality(model), extra=extra)


def _time_stages(history: list[Stage], models: dict, config: PruningConfig, progress: bool) -> None:
    """Every kept stage model timed side by side (``timing.compare``), the figures written into ``history``."""
    results = timing.compare(models, seq=config.latency_seq, new_tokens=config.decode_tokens,
                             rounds=config.timing_rounds, prefill_calls=config.prefill_passes, progress=progress)
    for stage in history:
        if stage.stage in results:
            r = results[stage.stage]
            stage.prefill_ms, stage.prefill_spread_ms = r["prefill_ms"], r["prefill_spread_ms"]
            stage.decode_tokens_per_s, stage.decode_spread = r["decode_tokens_per_s"], r["decode_spread"]
            stage.prefill_samples_ms, stage.decode_step_ms = r["prefill_samples_ms"], r["decode_step_ms"]


def _alignment(config: PruningConfig) -> dict:
    """Selection's width constraints: the hardware multiple, and the divisor the asked-for low-bit kernels need."""
    if set(INT4) & set(config.quantize):
        divisor = config.group_size
    else:
        divisor = lowbit.INT8_COLUMN_MULTIPLE if "int8" in config.quantize else None
    return dict(multiple=config.multiple, quant_group_size=divisor)


def _applier(model: nn.Module, plan_calib, config: PruningConfig, applied: list):
    """``apply(kind, plan)``: surgery (with reconstruction unless switched off), recorded in ``applied``."""
    def apply(kind: str, plan: PruningPlan) -> None:
        entry = {"kind": kind, "plan": plan.to_dict(), "selection": selection.selection_info(plan),
                 "summary": selection.format_summary(selection.plan_summary(model, plan), plan)}
        if config.reconstruct:
            report = prune_and_reconstruct(model, plan, plan_calib, progress=False)
            entry["reconstruction"] = report.rows
        else:
            apply_plan(model, plan)
        applied.append(entry)

    return apply


@contextmanager
def _about(setting: str, value=None) -> Iterator[None]:
    """Re-raise a package error from inside as a ``SettingError`` about ``setting`` (the CLI names its flag);
    one already about a setting of its own (a data file, say) goes through as it is."""
    try:
        yield
    except CourseError as error:
        if getattr(error, "setting", None) is not None:
            raise
        prefix = setting if value is None else f"{setting}={value!r}"
        raise SettingError(f"{prefix}: {error}", setting=setting) from None


def _scorer(calib, config: PruningConfig):
    """``score(kind, model)``: importance measured on ``calib``, head and neuron scores divided by their layer's
    median (``selection.layer_normalised``) so that one global ranking compares like with like."""
    def score(kind: str, model: nn.Module):
        if kind == "layers":
            return importance.block_influence(model, calib, metric=config.layer_metric)
        if kind == "heads":
            return selection.layer_normalised(importance.head_scores(model, calib, config.head_method))
        return selection.layer_normalised(importance.neuron_scores(model, calib, config.neuron_method))

    return score


def _select(kind: str, model: nn.Module, scores, count: int, config: PruningConfig) -> PruningPlan:
    """The selector of ``kind`` with the config's protections (and, for heads and neurons, alignment)."""
    protect = dict(protect_first=config.protect_first, protect_last=config.protect_last)
    if kind == "layers":
        return selection.select_layers(model, scores, count=count, **protect)
    if kind == "heads":
        return selection.select_heads(model, scores, count=count, granularity=config.granularity, **protect,
                                      **_alignment(config))
    return selection.select_neurons(model, scores, count=count, **protect, **_alignment(config))


def prune_step(model: nn.Module, config: PruningConfig, counts: dict[str, int], score, apply) -> None:
    """One round of the explicit path: remove layers, then heads, then neurons, scoring the model as it is.

    Applying each kind before scoring the next means no budget is spent on heads or neurons of a
    block that is about to go, and each score sees the model it will actually prune. ``counts``
    maps each kind of ``KIND_SETTINGS`` to how many to remove; ``score(kind, model)`` gives the
    scores (the run's ``_scorer``, or the dry run's constant ones) and ``apply(kind, plan)``
    changes the model. A count the model cannot give raises ``SettingError`` naming the setting.
    """
    for kind, setting in KIND_SETTINGS.items():
        if counts[kind]:
            scores = score(kind, model)
            with _about(setting, None if kind == "layers" else getattr(config, setting)):
                plan = _select(kind, model, scores, counts[kind], config)
            apply(kind, plan)


def _budget_rules(config: PruningConfig) -> dict:
    """The budget planner's constraints: the config's protections and the selection's alignment."""
    return dict(protect_first=config.protect_first, protect_last=config.protect_last, **_alignment(config))


def budget_step(model: nn.Module, plan_calib, config: PruningConfig, fraction: float) -> list[dict]:
    """One round of the budget path: ``plan_for_budget`` on the current model, then surgery."""
    applied: list[dict] = []
    plan = plan_for_budget(model, plan_calib, fraction=fraction, **_budget_rules(config), progress=False)
    _applier(model, plan_calib, config, applied)("budget", plan)
    return applied


def _budget(model: nn.Module, config: PruningConfig) -> tuple[int, int]:
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    units = [adapter.num_heads(b) if config.granularity == "query" else adapter.num_kv_heads(b) for b in blocks]
    heads = int(config.head_fraction * sum(units))
    neurons = int(config.neuron_fraction * sum(adapter.intermediate_size(b) for b in blocks))
    return heads, neurons


def _rounds(config: PruningConfig, model: nn.Module, tokens_total: int) -> list[tuple[dict[str, int], int]]:
    """Per round: how many of each kind the explicit path removes, and the recovery tokens (every total split)."""
    totals = (config.layers, *_budget(model, config))
    splits = [split_budget(total, config.steps) for total in totals]
    return [(dict(zip(KIND_SETTINGS, counts)), tokens)
            for *counts, tokens in zip(*splits, split_budget(tokens_total, config.steps))]


def _meta_model(model_config) -> nn.Module:
    """The model ``model_config`` describes, on the meta device: every shape, no weights, no memory."""
    with torch.device("meta"):
        return auto_class_for(model_config).from_config(copy.deepcopy(model_config))


def _constant_scores(kind: str, model: nn.Module):
    """Equal scores of the shape ``kind``'s selector takes: the dry run's stand-in for measured ones."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if kind == "layers":
        return torch.ones(len(blocks))
    if kind == "heads":
        return torch.ones(len(blocks), max(adapter.num_heads(b) for b in blocks))
    return [torch.ones(adapter.intermediate_size(b)) for b in blocks]


def _check_lengths(config: PruningConfig, model: nn.Module) -> None:
    """Timing feeds 1 x ``latency_seq`` tokens, and a decoder then ``decode_tokens`` more: all need positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    asked = {"latency_seq": config.latency_seq}
    if timing.generates(model):
        asked["decode_tokens"] = config.decode_tokens
    if limit is not None and sum(asked.values()) > limit:
        raise SettingError(f"latency_seq: {' + '.join(f'{name}={n}' for name, n in asked.items())} = "
                           f"{sum(asked.values())} tokens, but the model has {limit} positions "
                           f"(max_position_embeddings)", setting="latency_seq")


def _check_protections(config: PruningConfig, model: nn.Module) -> None:
    """Protected layers are never pruned, so a run that prunes at all needs one layer left unprotected.

    Selection and the planner check this too, but in their own words; here it is said of the two settings."""
    n_layers = len(adapter_for(model).blocks(model))
    protected = config.protect_first + config.protect_last
    prunes = config.param_fraction or config.layers or config.head_fraction or config.neuron_fraction
    if prunes and protected >= n_layers:
        raise SettingError(f"protect_first={config.protect_first} + protect_last={config.protect_last} = {protected} "
                           f"protected layers, but the model has {n_layers}: together at most {n_layers - 1} (one "
                           "layer at least must stay prunable)", setting="protect_first")


def _check_quantizable(config: PruningConfig, model: nn.Module) -> None:
    """The quantizers' own checks of ``config.quantize`` and ``group_size`` on ``model``'s widths."""
    with _about("quantize", config.quantize):
        check_formats(model, config.quantize, config.group_size)


def validate(config: PruningConfig, model_config) -> None:
    """Check ``config`` against the model before any work; raise ``SettingError`` naming the setting.

    Nothing is loaded, scored or written: the checks run on the model built from ``model_config``
    on the meta device (shapes without weights). What a request can achieve depends on
    protections, alignment, the quantizers' group sizes, GQA's equal groups and, over several
    rounds, on what earlier rounds removed; those rules live in ``selection``, ``budget`` and
    ``quantize``, so rather than restate them here the run's own selection and surgery are played
    through with constant scores, and the quantizers' own shape checks run on the model before and
    after. Scores decide which structures go, not how many can, so a request that passes meets no
    constraint later (for iterative runs that also remove layers, as nearly as constant scores tell).
    """
    try:
        adapter_for(model_config)
    except ValueError as error:  # pruned_modeling raises plain ValueError (its saved copy needs no course_lib)
        raise SettingError(f"model: {error}", setting="model") from None
    model = _meta_model(model_config)
    _check_lengths(config, model)
    _check_protections(config, model)
    _check_quantizable(config, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "fewer achievable than requested": the run says it itself
        if config.param_fraction:
            with _about("param_fraction", config.param_fraction):
                check_budget(model, fraction=config.param_fraction, **_budget_rules(config))
            return  # the planner aligns what it cuts; the unpruned widths are checked above
        for counts, _ in _rounds(config, model, 0):
            prune_step(model, config, counts, _constant_scores, lambda kind, plan: apply_plan(model, plan))
    _check_quantizable(config, model)


def run(config: PruningConfig, out_dir: str | Path, progress: bool = True, task=None) -> list[Stage]:
    """Run the pipeline and write the report folder; returns the history.

    ``task`` (default: the task of ``config.model``, see ``course_lib.tasks``) supplies the model,
    calibration data, quality measure and recovery data; tests pass a tiny one.
    """
    with _about("model"):
        task = task or task_for(config.model, get_profile(config.profile), config.data_files())
        model_config = task.model_config()
    validate(config, model_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = task.load()
    tokens_total = task.recovery_tokens if config.recovery_tokens is None else config.recovery_tokens
    distil = tokens_total and (config.distill_alpha > 0 or config.hidden_weight > 0)
    teacher = copy.deepcopy(model) if distil else None
    calib = task.calibration(seed=config.seed)
    plan_calib = task.planning_calibration(seed=config.seed) if config.param_fraction or config.reconstruct else None
    models: dict[str, nn.Module] = {}  # stage -> its model, timed together at the end
    history = [_measure("dense", model, task, config, models)]
    dense_blocks = block_parameters(model)
    plans = []
    for step, (counts, tokens) in enumerate(_rounds(config, model, tokens_total), start=1):
        if config.param_fraction:
            # each round removes its share of the *dense* budget, as a fraction of what is left now
            still = config.param_fraction * dense_blocks * step / config.steps - (dense_blocks - block_parameters(model))
            applied = budget_step(model, plan_calib, config, max(still, 1) / block_parameters(model))
        else:
            applied = []
            prune_step(model, config, counts, _scorer(calib, config),
                       _applier(model, calib if plan_calib is None else plan_calib, config, applied))
        plans.append({"step": step, "applied": applied})
        tag = f" {step}/{config.steps}" if config.steps > 1 else ""
        history.append(_measure(f"pruned{tag}", model, task, config, models))
        if tokens:
            train, validation = task.recovery_data(seed=config.seed + step)
            recipe = config.recovery_config(tokens, task.recovery_batch, task.recovery_learning_rate)
            result = fine_tune(model, train, validation, recipe,
                               teacher=teacher, data_collator=task.data_collator, progress=progress)
            history.append(_measure(f"recovered{tag}", model, task, config, models,
                                    recovery=_recovery_summary(result)))
    if int(os.environ.get("RANK", "0")) != 0:
        return history  # under `accelerate launch`, the other processes helped recover; rank 0 saves and reports
    with staged_directory(out / "model") as staged:
        model.save_pretrained(staged)
        task.tokenizer.save_pretrained(staged)
    (out / "plan.json").write_text(json.dumps(plans, indent=2))
    (out / "plan.txt").write_text("\n\n".join(f"step {p['step']}, {a['kind']}:\n{a['summary']}"
                                               for p in plans for a in p["applied"]) + "\n")
    history += _quantized(model, task, config, calib, out, models)
    _time_stages(history, models, config, progress)
    _write_report(config, task, history, out)
    return history


def _recovery_summary(result: dict) -> dict:
    """What a report says of one recovery round: budget, time, validation curve and the weights kept."""
    curve = [(0, result["initial_eval_loss"])] + [(h["step"] * result["tokens_per_step"], h["eval_loss"])
                                                  for h in result["log_history"] if "eval_loss" in h]
    return {key: result[key] for key in ("tokens", "steps", "planned_steps", "seconds", "initial_eval_loss",
                                         "best_eval_loss", "kept", "bf16")} | {"validation_curve": curve}


QUANTIZED_NAMES = {"int4": "int4 (CPU kernel, AWQ grid)", "awq": "AWQ int4 (autoawq)", "int8": "int8 weight-only",
                   "bf16": "bf16", "rtn": "RTN int4 (simulated)"}
QUANTIZED_NOTES = {
    "int4": "AWQ's integers and scales on PyTorch's CPU int4 kernel, computing in bf16 with the LM head in INT8; "
            "saved in `int4/`",
    "awq": "measured on the checkpoint saved in `awq/` and loaded back; on a CPU autoawq has no kernel (every "
           "forward dequantises), so it is not timed there: this checkpoint is for GPU serving",
    "int8": "weight-only INT8 per output row, LM head included, computing in bf16; saved in `int8/`",
    "bf16": "the whole model in bf16; saved in `bf16/`",
    "rtn": "round-to-nearest on the same INT4 grid, no calibration, weights kept in fp32: the quality AWQ has to "
           "beat; its speed is the fp32 model's",
}


ONNX_INT4 = "int4 (onnxruntime, AWQ grid)"
ONNX_INT4_NOTE = ("the int4 checkpoint in `int4/` run by ONNX Runtime (`course_lib.onnx_decoder`): int8 activations "
                  "times int4 weights in integer arithmetic (MatMulNBits), the LM head in INT8; on a CPU only")

CPU_KERNELS = ("int4", "int8")  # lowbit's layers run on PyTorch's CPU kernels only


def _quantized(model: nn.Module, task, config: PruningConfig, calib, out: Path, models: dict) -> list[Stage]:
    """One stage per ``config.quantize`` entry, each on a copy of ``model``; AWQ's search runs once for int4 and awq.

    Each is measured as a user will load it, from the checkpoint just written. On a GPU the CPU
    formats are built, saved and scored on the CPU but not timed (the others are timed on the GPU);
    on a CPU AWQ's checkpoint is not timed (autoawq has no CPU kernel), and the int4 checkpoint runs
    on ONNX Runtime too, as a stage of its own, or its note says why ``onnx_decoder`` cannot write it.
    """
    from .quantize import awq_int4, awq_to_cpu_int4, bf16, int8, load_awq, rtn_int4, save_awq

    device = next(model.parameters()).device
    flops = forward_flops(model, 1, config.latency_seq)  # the same arithmetic in fewer bits
    stages, awq = [], None
    if any(name in AWQ_SEARCHED for name in config.quantize):
        samples = get_profile(config.profile).quant_calib_samples
        awq = awq_int4(copy.deepcopy(model), calib[:samples], group_size=config.group_size)
        if "awq" in config.quantize:
            save_awq(awq, out / "awq", task.tokenizer)
    for name in config.quantize:
        if name == "awq":
            quantized = load_awq(out / "awq").to(device)
        elif name == "rtn":
            quantized = rtn_int4(copy.deepcopy(model), group_size=config.group_size)
        else:
            source = copy.deepcopy(awq if name == "int4" else model)
            quantized = {"int4": awq_to_cpu_int4, "int8": int8, "bf16": bf16}[name](
                source.cpu() if name in CPU_KERNELS else source)
            lowbit.save(quantized, out / name, task.tokenizer)
            quantized = lowbit.load(out / name).to("cpu" if name in CPU_KERNELS else device)
        timed = name not in CPU_KERNELS if device.type != "cpu" else name != "awq"
        cpu_int4 = name == "int4" and device.type == "cpu"
        why_no_ort = onnx_decoder.unsupported(quantized) if cpu_int4 else None
        note = QUANTIZED_NOTES[name] + (f"; not run on ONNX Runtime: {why_no_ort}" if why_no_ort else "")
        stages.append(_measure(QUANTIZED_NAMES[name], quantized, task, config, models, flops, timed=timed,
                               changes_later=False, note=note))
        if cpu_int4 and not why_no_ort:
            stages.append(_measure(ONNX_INT4, onnx_decoder.OrtDecoder(quantized), task, config, models, flops,
                                   changes_later=False, note=ONNX_INT4_NOTE))
    return stages


def speed_rows(history: list[Stage]) -> list[dict]:
    """Per stage, measured and ideal speedups against the dense model.

    Measured: the median of the ratios of neighbouring samples (``timing.paired_speedup``). Prefill is
    compute-bound, so its ideal is the FLOP ratio; decode reads every weight once per token, so
    its ideal is the weight-byte ratio. None where a stage was not timed.
    """
    dense = history[0]
    rows = []
    for s in history:
        prefill = timing.paired_speedup(dense.prefill_samples_ms, s.prefill_samples_ms)
        decode = timing.paired_speedup(dense.decode_step_ms, s.decode_step_ms)
        rows.append({"stage": s.stage, "prefill_speedup": prefill, "prefill_ideal": dense.flops / s.flops,
                     "decode_speedup": decode, "decode_ideal": dense.weight_bytes / s.weight_bytes})
    return rows


def _write_report(config: PruningConfig, task, history: list[Stage], out: Path) -> None:
    from .viz import plot_history, plot_recovery

    quality_name = task.quality_name
    rows = speed_rows(history)
    (out / "history.json").write_text(json.dumps({"config": asdict(config), "history": [asdict(s) for s in history],
                                                  "speed": rows}, indent=2))
    speed = (f"Speed: every stage's model timed side by side at the end of the run, {config.timing_rounds} rounds "
             f"after a warm-up round, the models taking turns pass by pass and token by token, "
             f"{torch.get_num_threads()} threads. Prefill: a forward pass of 1 x {config.latency_seq} tokens "
             f"({config.prefill_passes} per model and round), median (interquartile range) over passes; its ideal "
             f"speedup is the FLOP ratio. Decode: {config.decode_tokens} greedy tokens per round at batch 1 with the "
             f"KV cache after a {config.latency_seq}-token prompt, 1000 / the median step in ms (IQR over steps); its "
             "ideal speedup is the weight-byte ratio (each token reads every weight once). Speedups against the "
             "dense model are the median ratio of neighbouring samples; measured / ideal in brackets.")
    lines = [f"# Pruning report: {config.model} ({config.profile} profile)", "",
             f"Data: {config.data_files().describe()}.", "", speed, "",
             "| stage | params | weights MB | prefill ms (IQR) | prefill speedup | decode tok/s (IQR) "
             f"| decode speedup | {quality_name} |",
             "|---|---|---|---|---|---|---|---|"]
    for s, r in zip(history, rows):
        prefill = "not timed" if s.prefill_ms is None else f"{s.prefill_ms:.1f} ({s.prefill_spread_ms:.1f})"
        decode = "-" if s.decode_tokens_per_s is None else f"{s.decode_tokens_per_s:.1f} ({s.decode_spread:.1f})"
        speedups = []
        for measured, ideal in ((r["prefill_speedup"], r["prefill_ideal"]), (r["decode_speedup"], r["decode_ideal"])):
            speedups.append("-" if measured is None else
                            f"{measured:.2f}x of {ideal:.2f}x ({measured / ideal:.2f})")
        lines.append(f"| {s.stage} | {s.params / 1e6:.2f}M | {s.weight_bytes / 1e6:.1f} | {prefill} | {speedups[0]} | "
                     f"{decode} | {speedups[1]} | {s.quality:.4g} |")
    rounds = [s for s in history if "recovery" in s.extra]
    if rounds:
        lines += ["", "Recovery (validation loss: the training objective on the task's validation split; the quality "
                  "above is measured on the test split, which recovery never sees):", "",
                  "| stage | tokens | steps | minutes | validation loss before -> kept | weights kept |",
                  "|---|---|---|---|---|---|"]
        for s in rounds:
            r = s.extra["recovery"]
            lines.append(f"| {s.stage} | {r['tokens']:,} | {r['steps']} of {r['planned_steps']} | "
                         f"{r['seconds'] / 60:.1f} | {r['initial_eval_loss']:.4f} -> {r['best_eval_loss']:.4f} | "
                         f"{r['kept']} |")
        lines += ["", "![validation loss during recovery](recovery.png)"]
        plot_recovery(rounds, out / "recovery.png")
    notes = [f"- {s.stage}: {s.extra['note']}" for s in history if "note" in s.extra]
    if notes:
        lines += ["", *notes]
    lines += ["", "Plan per step: `plan.txt` (per layer: what was removed and, for the budget planner, its "
              "predicted error), `plan.json` (the same as data). Pruned model (before quantization): `model/`, "
              f"load with `{task.auto_class}.from_pretrained('model')` after `import course_lib`, "
              "or with `trust_remote_code=True`."]
    if "awq" in config.quantize:
        lines.append("AWQ INT4 model: `awq/`, load with `course_lib.quantize.load_awq('awq')`.")
    saved = [name for name in ("int4", "int8", "bf16") if name in config.quantize]
    if saved:
        lines.append(f"Low-bit models for the CPU: {', '.join(f'`{name}/`' for name in saved)}, load with "
                     f"`course_lib.lowbit.load('{saved[0]}')`.")
    lines += ["", "![quality and latency by stage](stages.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_history(history, quality_name, out / "stages.png")

