"""The side-by-side timer: the round-robin order, warm-up rounds left out of the figures, decode
only for models that generate, and real prefill / decode runs on a tiny decoder."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from course_lib import timing


def test_round_robin_rotates_who_goes_first():
    assert timing.round_robin(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                      ["a", "b", "c"]]
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        timing.round_robin(["a"], 0)


class _Fake(nn.Module):
    def __init__(self, generates: bool):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 10})()
        self.weight = nn.Parameter(torch.zeros(1))
        self._generates = generates

    def can_generate(self) -> bool:
        return self._generates


def test_compare_times_in_round_robin_order_and_drops_the_warmup():
    models = {"dense": _Fake(True), "pruned": _Fake(True), "encoder": _Fake(False)}
    names = {id(m): n for n, m in models.items()}
    calls = []

    def prefill(model, ids):
        calls.append(("prefill", names[id(model)]))
        return len(calls) / 1e3  # grows with every call: the warm-up round is the fastest

    def decode(model, ids, new_tokens):
        calls.append(("decode", names[id(model)]))
        return 100.0 * len(calls)

    results = timing.compare(models, seq=4, new_tokens=2, rounds=3, warmup=1, prefill_calls=2,
                             timers=(prefill, decode))
    expected = []
    for order in timing.round_robin(list(models), 4):
        for name in order:
            expected += [("prefill", name)] * 2 + ([("decode", name)] if name != "encoder" else [])
    assert calls == expected
    timed = [i + 1 for i, call in enumerate(calls) if call == ("prefill", "dense")][2:]  # after the warm-up round
    per_round = [(timed[i] + timed[i + 1]) / 2 for i in (0, 2, 4)]  # the median of each round's two calls
    assert results["dense"]["prefill_rounds_ms"] == pytest.approx(per_round)
    assert results["dense"]["prefill_ms"] == pytest.approx(per_round[1])  # the median over the 3 timed rounds
    assert results["dense"]["prefill_spread_ms"] > 0
    assert results["encoder"]["decode_tokens_per_s"] is None and results["encoder"]["decode_spread"] is None
    assert results["pruned"]["rounds"] == 3


def test_paired_speedup_is_the_median_of_each_rounds_ratio():
    # round 2 was slow for both models; medians of the columns alone would read 100 / 60 = 1.67
    dense, pruned = [100.0, 300.0, 90.0], [50.0, 150.0, 60.0]
    assert timing.paired_speedup(dense, pruned, higher_is_faster=False) == pytest.approx(2.0)
    assert timing.paired_speedup([10.0, 20.0], [15.0, 40.0], higher_is_faster=True) == pytest.approx(1.75)
    assert timing.paired_speedup(None, [1.0], higher_is_faster=True) is None


@pytest.mark.parametrize("argument,value", [("seq", 0), ("new_tokens", 0), ("rounds", 0), ("prefill_calls", 0),
                                            ("warmup", -1)])
def test_compare_names_bad_settings(argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be >= {0 if argument == 'warmup' else 1}, got {value}"):
        timing.compare({"a": _Fake(True)}, **{argument: value})


def test_decode_runs_exactly_the_asked_steps_with_the_cache():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    lengths = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    ids = timing.prompt(model, 6)
    assert ids.shape == (1, 6) and torch.equal(ids, timing.prompt(model, 6))  # seeded: the same for every model
    assert timing.decode_tokens_per_second(model, ids, 5) > 0
    assert lengths == [6, 1, 1, 1, 1, 1]  # one prefill, then one token per step
    assert timing.prefill_seconds(model, ids) > 0
    assert timing.generates(model) and not timing.generates(nn.Linear(2, 2))
