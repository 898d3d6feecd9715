"""Evaluation measures on constructed models and sequences where the answer is known."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from course_lib.evaluate import (count_parameters, language_model_scores, perplexity, repeated_ngram_share,
                                 storage_bytes)


class Uniform(nn.Module):
    """Predicts every token of the vocabulary with equal probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab) + self.dummy)


class Copycat(nn.Module):
    """Puts all mass on the token seen at the current position plus one: perfect on a ramp."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return SimpleNamespace(logits=nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 50)


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (7, 3), (200, 200)])
def test_uniform_model_perplexity_equals_vocabulary_size(context, stride):
    ids = torch.randint(0, 37, (101,), generator=torch.Generator().manual_seed(0))
    assert perplexity(Uniform(37), ids, context=context, stride=stride) == pytest.approx(37, rel=1e-6)


def test_every_token_scored_once_with_overlapping_windows():
    ids = torch.arange(50) % 13
    assert perplexity(Copycat(13), ids, context=8, stride=3) == pytest.approx(1.0, abs=1e-6)
    wrong = ids.clone()
    wrong[30] = 0  # one surprise among 49 predictions (and a wrong guess right after it)
    assert perplexity(Copycat(13), wrong, context=8, stride=3) > 1.5


def test_next_token_accuracy_counts_each_token_once():
    ids = torch.arange(50) % 13
    wrong = ids.clone()
    wrong[30] = 0  # the prediction of position 30 fails, and so does the one made from it
    scores = language_model_scores(Copycat(13), wrong, context=8, stride=3)
    assert scores["accuracy"] == pytest.approx(47 / 49)
    assert scores["perplexity"] == perplexity(Copycat(13), wrong, context=8, stride=3)
    assert language_model_scores(Copycat(13), ids, context=8, stride=3)["accuracy"] == 1.0


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(Uniform(5), torch.arange(10) % 5, context=4, stride=5)
    with pytest.raises(ValueError, match="context must be"):
        perplexity(Uniform(5), torch.arange(10) % 5, context=1)
    with pytest.raises(ValueError, match="ids must hold"):
        perplexity(Uniform(5), torch.tensor([1]), context=4)


def test_repeated_ngram_share():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6], n=3) == 0.0
    assert repeated_ngram_share([7] * 10, n=3) == pytest.approx(7 / 8)
    assert repeated_ngram_share([1, 2, 3, 1, 2, 3], n=3) == pytest.approx(1 / 4)
    assert repeated_ngram_share([1, 2], n=3) == 0.0


def test_count_parameters_counts_tied_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_parameters(nn.ModuleList([emb, head])) == 40
    assert count_parameters(nn.Linear(3, 2)) == 8


def test_storage_bytes_counts_each_tensor_once_with_buffers():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    norm = nn.BatchNorm1d(4)  # 8 parameters, 8 float buffers and one int64 counter
    assert storage_bytes(nn.ModuleList([emb, head, norm])) == 40 * 4 + 8 * 4 + 8 * 4 + 8
    assert storage_bytes(nn.Linear(3, 2).half()) == 8 * 2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_flops_follow_the_pruned_shapes_exactly():
    from course_lib.evaluate import forward_flops
    from course_lib.plan import PruningPlan
    from course_lib.surgery import apply_plan

    model = _tiny_llama()
    before = forward_flops(model, batch=2, seq=10)
    apply_plan(model, PruningPlan(neurons={1: list(range(16))}))
    # 16 neurons x (gate row + up row + down column) x hidden 32 multiply-adds, for 20 tokens.
    assert before - forward_flops(model, batch=2, seq=10) == 2 * 20 * 16 * 3 * 32


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_latency_reports_median_and_spread(mode):
    from course_lib.evaluate import latency

    threads = torch.get_num_threads()
    stats = latency(_tiny_llama(), seq=8, mode=mode, warmup=1, repeats=5, threads=threads + 1)
    assert stats["runs"] == 5 and 0 < stats["min_ms"] <= stats["median_ms"] and stats["iqr_ms"] >= 0
    assert torch.get_num_threads() == threads  # the thread setting is restored
    with pytest.raises(ValueError, match=r"mode must be one of \['decode', 'forward'\]"):
        latency(_tiny_llama(), mode="train")


def _window_by_window(model, ids, context, stride):
    """The definition, one window at a time with every logit: each token after the first scored once."""
    nll, correct, count, scored_until = 0.0, 0, 0, 0
    for start in range(0, ids.numel() - 1, stride):
        window = ids[start:start + context]
        logits = model(window[None]).logits[0, :-1]
        new = max(scored_until, start + 1) - start - 1
        nll += nn.functional.cross_entropy(logits[new:], window[new + 1:], reduction="sum").item()
        correct += int((logits[new:].argmax(-1) == window[new + 1:]).sum())
        count += window.numel() - 1 - new
        scored_until = start + window.numel()
        if scored_until == ids.numel():
            break
    return nll / count, correct / count


@pytest.mark.parametrize("length", [97, 100])  # the last window short, then exactly full
def test_batched_windows_and_kept_logits_score_what_one_window_at_a_time_does(length):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 61, (length,), generator=torch.Generator().manual_seed(1))
    mean_nll, accuracy = _window_by_window(model, ids, context=16, stride=12)
    scores = language_model_scores(model, ids, context=16, stride=12)
    assert scores["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
    assert scores["accuracy"] == accuracy
