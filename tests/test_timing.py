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


def test_compare_takes_turns_pass_by_pass_and_token_by_token_and_drops_the_warmup():
    models = {"dense": _Fake(True), "pruned": _Fake(True), "encoder": _Fake(False)}
    names = {id(m): n for n, m in models.items()}
    calls = []

    def prefill(model, ids):
        calls.append(("prefill", names[id(model)]))
        return len(calls) / 1e3  # grows with every call: the warm-up round is the fastest

    def decode(model, ids, new_tokens):
        for step in range(new_tokens):
            calls.append((f"step {step}", names[id(model)]))
            yield len(calls) / 1e3

    results = timing.compare(models, seq=4, new_tokens=2, rounds=3, warmup=1, prefill_calls=2,
                             timers=(prefill, decode))
    expected = []
    for order in timing.round_robin(list(models), 4):
        expected += [("prefill", name) for _ in range(2) for name in order]
        expected += [(f"step {step}", name) for step in range(2) for name in order if name != "encoder"]
    assert calls == expected
    dense_passes = [float(i + 1) for i, call in enumerate(calls) if call == ("prefill", "dense")][2:]  # after warm-up
    assert results["dense"]["prefill_samples_ms"] == pytest.approx(dense_passes)
    assert results["dense"]["prefill_ms"] == pytest.approx(sum(sorted(dense_passes)[2:4]) / 2)  # median of 6
    assert results["dense"]["prefill_spread_ms"] > 0
    dense_steps = [float(i + 1) for i, call in enumerate(calls) if call[0].startswith("step") and call[1] == "dense"][2:]
    assert results["dense"]["decode_step_ms"] == pytest.approx(dense_steps)
    assert results["dense"]["decode_tokens_per_s"] == pytest.approx(1e3 / ((dense_steps[2] + dense_steps[3]) / 2))
    assert results["encoder"]["decode_tokens_per_s"] is None and results["encoder"]["decode_step_ms"] is None
    assert results["pruned"]["rounds"] == 3


def test_paired_speedup_is_the_median_ratio_of_neighbouring_samples():
    # the second pair fell in a slow moment for both models; medians of the columns alone would read 100 / 60 = 1.67
    dense, pruned = [100.0, 300.0, 90.0], [50.0, 150.0, 60.0]
    assert timing.paired_speedup(dense, pruned) == pytest.approx(2.0)
    assert timing.paired_speedup(None, [1.0]) is None
    with pytest.raises(ValueError, match="as many on both sides, got 2 and 1"):
        timing.paired_speedup([1.0, 2.0], [1.0])


def test_compare_times_prompts_of_the_asked_batch():
    shapes = []

    def prefill(model, ids):
        shapes.append(tuple(ids.shape))
        return 1e-3

    timing.compare({"a": _Fake(False)}, seq=5, batch=3, rounds=1, warmup=0, prefill_calls=1,
                   timers=(prefill, None))
    assert shapes == [(3, 5)]


@pytest.mark.parametrize("argument,value", [("seq", 0), ("new_tokens", -1), ("rounds", 0), ("prefill_calls", 0),
                                            ("batch", 0), ("warmup", -1)])
def test_compare_names_bad_settings(argument, value):
    at_least = 0 if argument in ("new_tokens", "warmup") else 1
    with pytest.raises(ValueError, match=f"{argument} must be >= {at_least}, got {value}"):
        timing.compare({"a": _Fake(True)}, **{argument: value})


def test_no_new_tokens_times_prefill_only_and_runs_no_generation():
    model = _tiny_decoder()
    lengths = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    results = timing.compare({"a": model}, seq=6, new_tokens=0, rounds=2, warmup=1, prefill_calls=2)
    assert lengths == [6] * 6  # three rounds of two passes; no prompt pass for a generation, no step
    assert len(results["a"]["prefill_samples_ms"]) == 4
    assert results["a"]["decode_tokens_per_s"] is None and results["a"]["decode_step_ms"] is None


def test_decode_runs_exactly_the_asked_steps_with_the_cache():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    lengths = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    ids = timing.prompt(model, 6)
    assert ids.shape == (1, 6) and torch.equal(ids, timing.prompt(model, 6))  # seeded: the same for every model
    steps = timing.decode_steps(model, ids, 5)
    assert lengths == []  # a generator: nothing runs before the first step is asked for
    assert next(steps) > 0 and lengths == [6, 1]  # the untimed prefill, then the first step
    assert len(list(steps)) == 4 and lengths == [6, 1, 1, 1, 1, 1]  # one token per step with the cache
    assert timing.prefill_seconds(model, ids) > 0
    assert timing.generates(model) and not timing.generates(nn.Linear(2, 2))


def _tiny_decoder() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def test_hollow_replaces_every_linear_layer_and_leaves_the_model_alone():
    from course_lib import lowbit

    model = _tiny_decoder()
    model.model.layers[0].mlp.down_proj = lowbit.Int8Linear.from_linear(model.model.layers[0].mlp.down_proj)
    ids = timing.prompt(model, 5)
    with torch.no_grad():
        before = model(ids).logits
        empty = timing.hollow(model)
        logits = empty(ids).logits
    assert not any(isinstance(m, timing.LINEARS) for m in empty.modules())
    assert sum(isinstance(m, timing.Hollow) for m in empty.modules()) == 2 * 7 + 1  # q k v o gate up down, LM head
    assert empty.model.layers[0].mlp.down_proj.dtype == torch.bfloat16  # a low-bit layer's output dtype
    assert logits.shape == before.shape and not logits.any()  # the LM head returns zeros
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the original keeps its layers
    assert isinstance(model.model.layers[0].mlp.down_proj, lowbit.Int8Linear)


def test_decode_breakdown_splits_the_step_of_every_decoder():
    model = _tiny_decoder()
    rows = timing.decode_breakdown({"tiny": model, "encoder": nn.Linear(2, 2)}, seq=4, new_tokens=3, rounds=1)
    assert set(rows) == {"tiny"}  # encoders have no decode step
    row = rows["tiny"]
    assert row["step_ms"] == pytest.approx(1e3 / row["tokens_per_s"])
    assert row["linear_ms"] + row["rest_ms"] == pytest.approx(row["step_ms"]) and row["rest_ms"] > 0
    assert len(row["decode_step_ms"]) == 3
    with pytest.raises(ValueError, match=r"needs causal LMs; none of \['encoder'\] generates"):
        timing.decode_breakdown({"encoder": nn.Linear(2, 2)})
