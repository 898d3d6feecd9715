"""Recovery fine-tuning through the HF Trainer on tiny models: the loss goes down."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib.plan import PruningPlan
from course_lib.recovery import RecoveryConfig, fine_tune
from course_lib.surgery import apply_plan


def _tiny_pruned_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    return apply_plan(model, PruningPlan(heads={0: [0, 2]}, neurons={1: list(range(16))}))


def _pattern_dataset(n, seed):
    """Sequences counting up modulo 32 from a random start: easy to learn, impossible to guess."""
    starts = torch.randint(0, 32, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = ((starts + torch.arange(16)) % 32).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _eval_loss(model, data):
    ids = torch.tensor(data["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("lora_rank,lr,min_drop", [(0, 3e-3, 0.5), (4, 2e-2, 0.2)])
def test_recovery_lowers_the_loss(lora_rank, lr, min_drop):
    model = _tiny_pruned_llama()
    train, held_out = _pattern_dataset(64, 1), _pattern_dataset(16, 2)
    before = _eval_loss(model, held_out)
    result = fine_tune(model, train, held_out, RecoveryConfig(epochs=3, learning_rate=lr, lora_rank=lora_rank,
                                                            patience=2), progress=False)
    after = _eval_loss(model, held_out)
    assert after < before - min_drop
    assert result["best_eval_loss"] == pytest.approx(after, rel=1e-4)
    assert type(model).__name__ == "PrunedLlamaForCausalLM"  # LoRA merged away, shapes kept
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_distillation_from_the_unpruned_teacher_lowers_the_loss():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    student = apply_plan(copy.deepcopy(teacher), PruningPlan(layers=[1]))
    train, held_out = _pattern_dataset(64, 1), _pattern_dataset(16, 2)
    before = _eval_loss(student, held_out)
    fine_tune(student, train, held_out, RecoveryConfig(epochs=2, learning_rate=3e-3, distill_alpha=0.5),
            teacher=teacher, progress=False)
    assert _eval_loss(student, held_out) < before


def test_bad_recovery_settings_name_the_parameter():
    with pytest.raises(ValueError, match="invalid warmup=1.5"):
        RecoveryConfig(warmup=1.5)
    with pytest.raises(ValueError, match="invalid epochs=0"):
        RecoveryConfig(epochs=0)
    model = _tiny_pruned_llama()
    with pytest.raises(ValueError, match="distill_alpha"):
        fine_tune(model, _pattern_dataset(4, 1), _pattern_dataset(4, 2), teacher=copy.deepcopy(model))
