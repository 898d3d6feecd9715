"""The course's pruned checkpoints: each built by the recipe of the notebook that teaches it, kept in the cache.

The later notebooks (recovery, iterative pruning, quantization) start where a user would: from a
pruned model saved to disk and loaded back with ``from_pretrained``. :func:`course_checkpoint`
returns such a directory, building it the first time with the named recipe (all or nothing:
``paths.staged_directory``), so a notebook runs whether or not the one before it ran. Each
directory holds the model, its tokenizer and ``recipe.json`` (what was removed, and how it was
chosen).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingError
from . import pruned_modeling  # noqa: F401  (registers the pruned types: the checkpoints load with the Auto classes)
from .paths import build_once, cache_dir, staged_directory
from .profiles import Profile, get_profile


@dataclass(frozen=True)
class Recipe:
    notebook: str  # where the recipe is taught
    description: str
    build: Callable[[Profile], tuple]  # profile -> (pruned model, tokenizer, plan as JSON)


def _minilm_heads(profile: Profile, fraction: float) -> tuple:
    """Notebook 03's head pruning: Taylor scores on 8 x ``calib_samples`` train sentences, its selection rules."""
    from .exercises.heads import sentiment_batches
    from .importance import head_scores
    from .selection import select_heads
    from .sentiment import load_baseline
    from .surgery import apply_plan

    model, tokenizer, _ = load_baseline(profile.name)
    calib = sentiment_batches(tokenizer, "train", n=8 * profile.calib_samples, batch_size=16)
    scores = head_scores(model, calib, "taylor", progress=False)
    plan = select_heads(model, scores, fraction=fraction, protect_first=1, protect_last=1, min_heads=2, multiple=64)
    return apply_plan(model, plan), tokenizer, plan.to_dict()


def _smollm2_layers(profile: Profile, count: int) -> tuple:
    """Notebook 04's layer pruning: block influence on the calibration windows, the ``count`` lowest removed."""
    from .data import calibration_batches
    from .importance import block_influence
    from .selection import select_layers
    from .surgery import apply_plan
    from .zoo import load_decoder

    model, tokenizer = load_decoder(profile.decoder)
    calib = calibration_batches(tokenizer, profile.calib_samples, profile.calib_tokens)
    plan = select_layers(model, block_influence(model, calib, progress=False), count=count)
    return apply_plan(model, plan), tokenizer, plan.to_dict()


def _smollm2_recovered(profile: Profile, source: str, tokens: int) -> tuple:
    """Notebook 06's decoder recovery of ``source``: ``tokens`` tokens at 3e-4 on 256-token windows of the
    calibration articles (batch 4, embeddings frozen), validated on 8 windows of the validation articles."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_prose
    from .recovery import RecoveryConfig, causal_lm_dataset, fine_tune

    directory = course_checkpoint(source, profile.name)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    prose = load_prose()
    train = causal_lm_dataset(tokenizer, prose["calibration"]["text"], 256).shuffle(seed=0)
    validation = causal_lm_dataset(tokenizer, prose["validation"]["text"], 256, limit=8)
    summary = fine_tune(model, train, validation, RecoveryConfig(tokens=tokens, learning_rate=3e-4, batch_size=4,
                                                                 evaluations=2, freeze_embeddings=True), progress=False)
    return model, tokenizer, recovered_plan(directory, summary)


def recovered_plan(source: Path, summary: dict) -> dict:
    """The plan of the checkpoint in ``source`` with what recovery did (``fine_tune``'s ``summary``)."""
    plan = json.loads((Path(source) / "recipe.json").read_text())["plan"]
    return {**plan, "recovery": {k: summary[k] for k in ("tokens", "steps", "kept", "best_eval_loss")}}


RECIPES: dict[str, Recipe] = {
    "minilm-heads-50": Recipe("03", "the MiniLM sentiment classifier with half of its heads removed (Taylor scores, "
                              "first and last layer kept, at least 2 heads per layer, widths in steps of 64)",
                              lambda profile: _minilm_heads(profile, 0.5)),
    "smollm2-layers-7": Recipe("04", "SmolLM2-135M with the 7 of its 30 layers of lowest block influence removed "
                               "(25% of the layers)", lambda profile: _smollm2_layers(profile, 7)),
    "smollm2-layers-7-recovered": Recipe("06", "smollm2-layers-7 recovered on 4,096 tokens of the calibration articles "
                                         "at learning rate 3e-4", lambda profile: _smollm2_recovered(
                                             profile, "smollm2-layers-7", 4096)),
}


def checkpoint_dir(name: str, profile: str | None = None) -> Path:
    return cache_dir() / "checkpoints" / f"{name}-{get_profile(profile).name}"


def course_checkpoint(name: str, profile: str | None = None, built: tuple | None = None) -> Path:
    """The directory of the course checkpoint ``name`` (see ``RECIPES``), built first if it is not there yet.

    ``built``: ``(model, tokenizer, plan)`` that the caller has just made by this very recipe, stored
    instead of building it again when the checkpoint is missing. Notebook 06 runs the recovery
    recipe in view and hands its result here, so that notebook 08 does not train the same model again.
    """
    if name not in RECIPES:
        raise SettingError(f"checkpoint name={name!r} is unknown; choose one of {sorted(RECIPES)}")
    chosen = get_profile(profile)
    directory = checkpoint_dir(name, chosen.name)

    def store() -> None:
        recipe = RECIPES[name]
        model, tokenizer, plan = built if built is not None else recipe.build(chosen)
        with staged_directory(directory) as staged:
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            (staged / "recipe.json").write_text(json.dumps(
                {"name": name, "notebook": recipe.notebook, "description": recipe.description,
                 "profile": chosen.name, "plan": plan}, indent=2))

    return build_once(directory, "recipe.json", store)
