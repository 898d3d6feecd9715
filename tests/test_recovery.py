"""Recovery fine-tuning through the HF Trainer on tiny models: the loss goes down."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from datasets import Dataset
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainerControl,
                          TrainingArguments)

from course_lib.plan import PruningPlan
from course_lib.recovery import (BestWeights, DistillationTrainer, RecoveryConfig, RecoveryTrainer, distillation_loss,
                                 fine_tune, hidden_state_loss, length_sorted_parts, shortest_first)
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


@pytest.mark.parametrize("setting,match", [
    (dict(warmup=1.5), "invalid warmup=1.5"), (dict(epochs=0), "invalid epochs=0"),
    (dict(tokens=0), "invalid tokens=0"), (dict(tokens=-5), "invalid tokens=-5"),
    (dict(temperature=0.0), "invalid temperature=0.0"), (dict(temperature=-1.0), "invalid temperature=-1.0"),
    (dict(hidden_weight=-0.1), "invalid hidden_weight=-0.1"), (dict(evaluations=0), "invalid evaluations=0"),
])
def test_bad_recovery_settings_name_the_parameter(setting, match):
    with pytest.raises(ValueError, match=match):
        RecoveryConfig(**setting)


class _Bag(torch.nn.Module):
    """A model with no transformer blocks at all: nothing for LoRA to wrap."""

    config = LlamaConfig(model_type="unknown")

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(32, 8)


@pytest.mark.parametrize("model,config,teacher,match", [
    ("pruned", RecoveryConfig(), "teacher", "teacher given but distill_alpha=0"),
    ("pruned", RecoveryConfig(distill_alpha=0.5), None, "need a teacher"),
    ("pruned", RecoveryConfig(hidden_weight=1.0), None, "need a teacher"),
    ("bag", RecoveryConfig(lora_rank=4), None, "lora_rank=4: no LoRA target modules"),
])
def test_bad_settings_fail_before_any_training(model, config, teacher, match, monkeypatch):
    model = _tiny_pruned_llama() if model == "pruned" else _Bag()
    before = copy.deepcopy(model.state_dict())
    monkeypatch.setattr("course_lib.recovery.Trainer.train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=match):
        fine_tune(model, _pattern_dataset(4, 1), _pattern_dataset(4, 2), config,
                  teacher=copy.deepcopy(model) if teacher else None, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_distillation_loss_is_the_softened_kl_computed_by_hand():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # batch 2, 3 positions, 5 classes
    t = 2.5
    by_hand = 0.0
    for b in range(2):
        for i in range(3):
            p = torch.softmax(teacher[b, i] / t, -1)
            q = torch.softmax(student[b, i] / t, -1)
            by_hand += float((p * (p.log() - q.log())).sum())
    expected = by_hand / 6 * t * t  # mean over the 6 positions, times T^2
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    # a classifier's logits (batch x classes) are positions too
    assert distillation_loss(student[0], teacher[0], t).item() == pytest.approx(
        sum(float((torch.softmax(teacher[0, i] / t, -1) * (torch.log_softmax(teacher[0, i] / t, -1)
             - torch.log_softmax(student[0, i] / t, -1))).sum()) for i in range(3)) / 3 * t * t, rel=1e-5)


def test_hidden_state_loss_matches_every_layer_or_only_the_last():
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 4, 8) for _ in range(4))  # embeddings + 3 layers
    same = tuple(h.clone() for h in teacher)
    assert hidden_state_loss(same, teacher).item() == pytest.approx(0.0, abs=1e-7)
    doubled = (teacher[0], *(2 * h for h in teacher[1:]))
    assert hidden_state_loss(doubled, teacher).item() == pytest.approx(1.0, rel=1e-5)  # ||2h - h||^2 / ||h||^2
    fewer = (teacher[0], torch.randn(2, 4, 8), teacher[-1])  # a layer removed: only the final state counts
    assert hidden_state_loss(fewer, teacher).item() == pytest.approx(0.0, abs=1e-7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    padded = tuple(h.clone() for h in teacher)
    for h in padded[1:]:
        h[0, 2:] += 100.0  # padding positions: ignored under the mask
    assert hidden_state_loss(padded, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_token_budget_sets_the_steps_and_recovery_never_changes_shapes():
    model = _tiny_pruned_llama()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    train, held_out = _pattern_dataset(64, 1), _pattern_dataset(16, 2)
    # 16 tokens a row, batch 8 = 128 tokens a step; 1000 tokens -> 8 steps, rounded up to a multiple of 4
    result = fine_tune(model, train, held_out, RecoveryConfig(tokens=1000, learning_rate=3e-3, patience=4),
                       progress=False)
    assert (result["planned_steps"], result["tokens_per_step"]) == (8, 128)
    assert result["steps"] == 8 and result["tokens"] == 1024
    evaluated = [h["step"] for h in result["log_history"] if "eval_loss" in h]
    assert evaluated == [2, 4, 6, 8]  # four evenly spaced evaluations, the last at the final step
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert result["best_eval_loss"] < result["initial_eval_loss"]


@pytest.mark.parametrize("tokens,warmup_steps", [(128, 0), (512, 0), (1280, 1)])
def test_every_step_of_a_short_budget_trains(tokens, warmup_steps):
    """A warm-up share shorter than one step is no warm-up: a first step at learning rate 0 would
    leave a one-step round of an iterative schedule untrained."""
    model = _tiny_pruned_llama()
    before = copy.deepcopy(model.state_dict())
    train, held_out = _pattern_dataset(64, 1), _pattern_dataset(16, 2)
    result = fine_tune(model, train, held_out, RecoveryConfig(tokens=tokens, learning_rate=3e-3, evaluations=1,
                                                              warmup=0.1), progress=False)
    rates = [h["learning_rate"] for h in result["log_history"] if "learning_rate" in h]
    assert len(rates) == tokens // 128
    assert sum(rate == 0 for rate in rates) == warmup_steps
    assert result["best_eval_loss"] < result["initial_eval_loss"]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_bf16_recovery_hands_back_a_model_that_computes_in_fp32(lora_rank):
    """accelerate wraps forward in bf16 autocast for training; the wrapper must not outlive it."""
    model = _tiny_pruned_llama()
    fine_tune(model, _pattern_dataset(32, 1), _pattern_dataset(8, 2),
              RecoveryConfig(tokens=512, learning_rate=3e-3, lora_rank=lora_rank, bf16=True), progress=False)
    assert "forward" not in model.__dict__
    twin = _tiny_pruned_llama()
    twin.load_state_dict(model.state_dict())
    ids = torch.tensor(_pattern_dataset(2, 3)["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin.eval()(ids).logits)  # bf16 autocast would differ at 1e-3


def test_recovery_keeps_the_weights_it_started_from_when_training_only_hurts():
    model = _tiny_pruned_llama()
    train, held_out = _pattern_dataset(64, 1), _pattern_dataset(16, 2)
    fine_tune(model, train, held_out, RecoveryConfig(epochs=3, learning_rate=3e-3), progress=False)
    trained = copy.deepcopy(model.state_dict())
    shuffled = Dataset.from_dict({"input_ids": torch.randint(0, 32, (64, 16), generator=torch.Generator()
                                                             .manual_seed(3)).tolist()})
    noise = shuffled.add_column("labels", shuffled["input_ids"])  # random tokens: nothing to learn, much to forget
    result = fine_tune(model, noise, held_out, RecoveryConfig(tokens=2048, learning_rate=3e-2), progress=False)
    assert result["kept"].startswith("the weights before training")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_an_interrupted_recovery_hands_back_the_model_it_was_given(lora_rank, monkeypatch):
    model = _tiny_pruned_llama()
    before = copy.deepcopy(model.state_dict())

    def interrupted(trainer, *args, **kwargs):
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)  # half-way through, every weight has moved
        raise KeyboardInterrupt

    monkeypatch.setattr("course_lib.recovery.Trainer.train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(model, _pattern_dataset(16, 1), _pattern_dataset(4, 2),
                  RecoveryConfig(tokens=512, lora_rank=lora_rank, freeze_embeddings=True), progress=False)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.get_input_embeddings().weight.requires_grad  # the freeze is undone too


@pytest.mark.parametrize("bf16_seconds,expected", [(0.004, False), (0.0005, True)])
def test_cpu_bf16_autocast_only_where_measured_faster(monkeypatch, bf16_seconds, expected):
    import time as clock

    from course_lib import recovery

    def linear(a, b):  # fp32 products take 2 ms; bf16 ones as the parameter says
        clock.sleep(bf16_seconds if a.dtype == torch.bfloat16 else 0.002)

    monkeypatch.setattr(recovery.nn.functional, "linear", linear)
    recovery._cpu_bf16_faster.cache_clear()
    try:
        assert recovery._cpu_bf16_faster() is expected
    finally:
        recovery._cpu_bf16_faster.cache_clear()


def test_evaluation_rows_go_shortest_first_and_fixed_length_rows_stay_as_they_are():
    varied = Dataset.from_dict({"input_ids": [[5, 6, 7], [5], [5, 6], [8]],
                                "attention_mask": [[1, 1, 1], [1], [1, 1], [1]], "labels": [0, 1, 2, 3]})
    assert shortest_first(varied)["labels"] == [1, 3, 2, 0]   # by length, ties kept in their order
    packed = Dataset.from_dict({"input_ids": [[3, 1], [1, 2]], "labels": [[3, 1], [1, 2]]})
    assert shortest_first(packed) is packed


def test_best_weights_keeps_the_lowest_evaluation_and_stops_after_patience():
    layer, kept, control = nn.Linear(2, 2), BestWeights(patience=2), TrainerControl()
    for step, loss in enumerate([3.0, 2.0, 2.0, 2.5], start=1):  # the best at step 2; a tie does not count
        with torch.no_grad():
            layer.weight.fill_(step)
        kept.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_loss": loss}, model=layer)
        assert control.should_training_stop == (step == 4)
    assert (kept.best, kept.step) == (2.0, 2)
    assert torch.equal(kept.weights["weight"], torch.full((2, 2), 2.0))  # a copy, not the live tensor


def test_a_padded_batch_splits_into_length_sorted_parts_cut_to_their_own_columns():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(16).reshape(4, 4) * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 3])}
    short, long = length_sorted_parts(batch)
    assert short["labels"].tolist() == [1, 3] and long["labels"].tolist() == [2, 0]
    assert short["input_ids"].tolist() == [[4, 0], [12, 13]] and long["attention_mask"].shape == (2, 4)
    left = {**batch, "attention_mask": mask.flip(1), "input_ids": batch["input_ids"].flip(1)}
    assert length_sorted_parts(left)[0]["input_ids"].tolist() == [[0, 4], [13, 12]]   # left padding: the left columns go
    assert length_sorted_parts({**batch, "attention_mask": torch.ones(4, 4, dtype=torch.long)}) is None  # nothing to cut
    assert length_sorted_parts({**batch, "labels": batch["input_ids"]}) is None   # labels per token: a mean over tokens


def _classifier_batch():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    lengths = torch.tensor([3, 12, 5, 9, 2, 7, 4])   # parts of 4 and 3 rows: their shares differ
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = torch.randint(1, 64, (7, 12), generator=torch.Generator().manual_seed(1)) * mask
    return BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask,
                                                    "labels": torch.tensor([0, 1, 2, 1, 0, 2, 1])}


@pytest.mark.parametrize("distill", [False, True])
def test_training_on_length_sorted_parts_gives_the_whole_batchs_loss_and_gradient(distill, tmp_path):
    model, batch = _classifier_batch()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = (DistillationTrainer(model=model, args=args, teacher=copy.deepcopy(model), alpha=0.5, temperature=2.0)
               if distill else RecoveryTrainer(model=model, args=args))
    widths = []
    model.bert.embeddings.register_forward_hook(lambda module, inputs, output: widths.append(output.shape[:2]))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert widths == [(4, 5), (3, 12)]   # two forward passes on rows of similar length, not one of 7 x 12
    trainer.splits_rows = False   # the whole padded batch at once, as the plain Trainer runs it
    whole = trainer.compute_loss(model, batch)
    whole.backward()
    assert widths[-1] == (7, 12)
    assert torch.allclose(loss, whole, atol=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))


def test_the_hidden_state_loss_is_not_split_into_parts(tmp_path):
    model, batch = _classifier_batch()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillationTrainer(model=model, args=args, teacher=copy.deepcopy(model), alpha=0.5, temperature=2.0,
                                  hidden_weight=1.0)   # a ratio of sums over the whole batch's tokens
    widths = []
    model.bert.embeddings.register_forward_hook(lambda module, inputs, output: widths.append(output.shape[:2]))
    trainer.compute_loss(model, batch)
    assert widths == [(7, 12)]   # the student's one pass on the whole batch (the teacher's is not hooked)
