"""Notebook 06: the distillation-loss check (right and wrong answers), the Trainer-log readings, the run
explorer (headless) and the course checkpoints (built once, all or nothing, loadable with the Auto classes)."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from course_lib import checkpoints
from course_lib.exercises.recovery import (check_distillation_loss, gap_closed, learning_rate_schedule,
                                           recovery_run_explorer, validation_curve)
from course_lib.plan import PruningPlan
from course_lib.recovery import distillation_loss
from course_lib.surgery import apply_plan


def _kl(s, t, temperature, soften=True, reverse=False, scale=True, reduce="positions"):
    d = temperature if soften else 1.0
    log_s, log_t = torch.log_softmax(s / d, -1), torch.log_softmax(t / d, -1)
    p, q = (log_s, log_t) if reverse else (log_t, log_s)
    kl = p.exp() * (p - q)
    kl = kl.sum(-1).mean() if reduce == "positions" else kl.mean()
    return kl * temperature ** 2 if scale else kl


def test_the_library_loss_is_the_softened_kl_times_t_squared():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(float(_kl(s, t, 2.0)), rel=1e-5)


def test_check_distillation_loss_accepts_the_right_answer():
    check_distillation_loss(lambda s, t, temperature: _kl(s, t, temperature))


@pytest.mark.parametrize("wrong,message", [
    (dict(scale=False), "multiply by temperature \\*\\* 2"),
    (dict(reverse=True), "wrong way round"),
    (dict(soften=False), "soften both distributions"),
    (dict(reduce="elements"), "sum the KL over the vocabulary"),
])
def test_check_distillation_loss_names_the_mistake(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_distillation_loss(lambda s, t, temperature: _kl(s, t, temperature, **wrong))


def test_check_distillation_loss_wants_a_scalar_and_reports_other_errors():
    with pytest.raises(AssertionError, match="return a scalar tensor"):
        check_distillation_loss(lambda s, t, temperature: _kl(s, t, temperature) * torch.ones(2))
    with pytest.raises(AssertionError, match="at temperature 1.0: expected"):
        check_distillation_loss(lambda s, t, temperature: _kl(s, t, temperature) + 1.0)


LOG = [{"step": 1, "learning_rate": 1e-4, "loss": 3.0}, {"step": 2, "learning_rate": 5e-5, "loss": 2.9},
       {"step": 2, "eval_loss": 2.8}, {"step": 3, "learning_rate": 1e-5, "loss": 2.7}, {"step": 3, "eval_loss": 2.85},
       {"train_runtime": 1.0, "step": 3}]


def test_trainer_log_readings_and_the_gap():
    assert validation_curve(LOG) == ([2, 3], [2.8, 2.85])
    assert learning_rate_schedule(LOG) == ([1, 2, 3], [1e-4, 5e-5, 1e-5])
    assert gap_closed(10.0, 20.0, 15.0) == pytest.approx(0.5)  # perplexity: lower is better
    assert gap_closed(0.8, 0.7, 0.78) == pytest.approx(0.8)  # accuracy: higher is better
    with pytest.raises(AssertionError, match="no gap to close"):
        gap_closed(1.0, 1.0, 2.0)


def test_recovery_run_explorer_headless():
    runs = {"a": {"log_history": LOG, "initial_eval_loss": 3.0, "best_eval_loss": 2.8, "steps": 3,
                  "planned_steps": 8, "kept": "best checkpoint (step 2)", "quality": 0.75},
            "b": {"log_history": LOG, "initial_eval_loss": 3.0, "best_eval_loss": 2.8, "steps": 8,
                  "planned_steps": 8, "kept": "best checkpoint (step 2)"}}
    widget, explorer = recovery_run_explorer(runs, quality_name="accuracy")
    assert explorer.current.name == "a" and explorer.current.stopped_early and explorer.figure is not None
    assert "early stopping after 3 of 8 steps" in explorer.label.value and "test accuracy 0.75" in explorer.label.value
    explorer.choice.value = "b"  # what a click does
    assert explorer.current.name == "b" and not explorer.current.stopped_early and explorer.current.quality is None
    assert "all 8 steps" in explorer.label.value
    with pytest.raises(AssertionError, match="unknown"):
        explorer.update("c")
    with pytest.raises(AssertionError, match="non-empty"):
        recovery_run_explorer({})


@pytest.fixture
def tiny_recipe(monkeypatch, tmp_path):
    """A course checkpoint recipe on a tiny random Llama (the real ones load the embedded models)."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    builds = []

    def build(profile):
        builds.append(profile.name)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
        plan = PruningPlan(layers=[1])
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
        return apply_plan(model, plan), tokenizer, plan.to_dict()

    monkeypatch.setitem(checkpoints.RECIPES, "tiny-layers-1", checkpoints.Recipe("04", "a tiny test model", build))
    return builds


def _tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path / "tokenizer"
    if not directory.exists():
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1},
                                                                                   unk_token="[UNK]")))
        fast.save_pretrained(directory)
    return directory


def test_course_checkpoint_is_built_once_and_loads_with_the_auto_class(tiny_recipe):
    directory = checkpoints.course_checkpoint("tiny-layers-1", "ci")
    assert directory == checkpoints.checkpoint_dir("tiny-layers-1", "ci") and directory.name == "tiny-layers-1-ci"
    recipe = json.loads((directory / "recipe.json").read_text())
    assert recipe["notebook"] == "04" and recipe["plan"]["layers"] == [1] and recipe["profile"] == "ci"
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.num_hidden_layers == 2
    assert checkpoints.course_checkpoint("tiny-layers-1", "ci") == directory and tiny_recipe == ["ci"]  # not rebuilt


def test_a_model_built_in_view_is_stored_as_the_checkpoint_and_not_built_again(tiny_recipe, tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    directory = checkpoints.course_checkpoint("tiny-layers-1", "ci", built=(model, tokenizer, {"layers": [1]}))
    assert tiny_recipe == []  # the recipe did not run
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    assert json.loads((directory / "recipe.json").read_text())["plan"] == {"layers": [1]}


def test_course_checkpoint_names_the_choices_and_leaves_nothing_when_the_build_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="name='nope' is unknown; choose one of .*minilm-heads-50"):
        checkpoints.course_checkpoint("nope")

    def broken(profile):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        return model, None, {}  # no tokenizer: saving fails halfway

    monkeypatch.setitem(checkpoints.RECIPES, "broken", checkpoints.Recipe("00", "fails", broken))
    with pytest.raises(AttributeError):
        checkpoints.course_checkpoint("broken", "ci")
    parent = checkpoints.checkpoint_dir("broken", "ci").parent
    assert not any(parent.iterdir())  # neither the checkpoint nor a partial directory
