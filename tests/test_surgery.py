"""Surgery is exact: a surgically pruned model computes what the dense model computes with the
removed structures' contributions zeroed.

The property tests draw small random models of every supported family (BERT, RoBERTa, Llama with
MHA / GQA / MQA, Qwen2 with q/k/v biases, Mistral) together with random valid plans, and compare
the pruned model against a *reference* built without the library's adapters: a copy of the dense
model whose removed query heads have their output-projection input columns zeroed, whose removed
neurons have their down-projection input columns zeroed, and whose removed layers are identities.

The plain tests cover bad plans (a ``ValueError`` naming the layer and the problem, the model left
untouched), unsupported families, and pruning an already pruned model.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from course_lib.plan import PruningPlan
from course_lib.surgery import apply_plan, parameters_removed

ATOL = 1e-5
VOCAB = 50
# 100 random plans per family (seven families, ~40 ms each): the suite's time budget buys breadth over
# families rather than depth within one; hypothesis still shrinks any failure to a minimal plan.
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- random configs ---------------------------------------------------------------------------
@st.composite
def encoder_configs(draw, family: str):
    """(config, model class) of a tiny BERT or RoBERTa; head_dim = hidden / heads there."""
    pairs = [(h, d) for h in range(1, 7) for d in range(4, 17) if 16 <= h * d <= 64]
    n_heads, head_dim = draw(st.sampled_from(pairs))
    common = dict(
        vocab_size=VOCAB,
        hidden_size=n_heads * head_dim,
        num_hidden_layers=draw(st.integers(1, 4)),
        num_attention_heads=n_heads,
        intermediate_size=draw(st.integers(2, 48)),
        hidden_act=draw(st.sampled_from(["gelu", "relu", "gelu_new"])),
        initializer_range=0.2,
        attn_implementation=draw(st.sampled_from(["eager", "sdpa"])),
    )
    if family == "roberta":
        return RobertaConfig(max_position_embeddings=40, pad_token_id=1, **common), RobertaModel
    return BertConfig(max_position_embeddings=32, **common), BertModel


@st.composite
def decoder_configs(draw, family: str):
    """(config, model class) of a tiny Llama-family decoder with the family's head layout."""
    if family == "llama_mha":
        n_kv = n_q = draw(st.integers(1, 4))
    elif family == "llama_gqa":
        n_kv = draw(st.integers(2, 3))
        n_q = n_kv * draw(st.integers(2, 4))
    elif family == "llama_mqa":
        n_kv, n_q = 1, draw(st.integers(2, 6))
    else:  # qwen2, qwen3, mistral: any layout
        n_kv = draw(st.integers(1, 3))
        n_q = n_kv * draw(st.integers(1, 3))
    n_layers = draw(st.integers(1, 4))
    common = dict(
        vocab_size=VOCAB,
        hidden_size=draw(st.sampled_from([h for h in range(16, 65) if h % n_q == 0])),  # LlamaConfig insists
        intermediate_size=draw(st.integers(2, 48)),
        num_hidden_layers=n_layers,
        num_attention_heads=n_q,
        num_key_value_heads=n_kv,
        head_dim=draw(st.sampled_from([4, 6, 8, 10, 12, 14, 16])),
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=draw(st.booleans()),
        attn_implementation=draw(st.sampled_from(["eager", "sdpa"])),
    )
    if family == "qwen2":  # biases on q/k/v; sliding-window layers mixed with full ones
        sliding = draw(st.booleans())
        return Qwen2Config(use_sliding_window=sliding, sliding_window=4, max_window_layers=draw(st.integers(0, n_layers)),
                           **common), Qwen2ForCausalLM
    if family == "qwen3":  # per-head q_norm / k_norm; optional biases on q/k/v/o; sliding layers
        sliding = draw(st.booleans())
        return Qwen3Config(attention_bias=draw(st.booleans()), use_sliding_window=sliding, sliding_window=4,
                           max_window_layers=draw(st.integers(0, n_layers)), **common), Qwen3ForCausalLM
    if family == "mistral":
        return MistralConfig(sliding_window=draw(st.sampled_from([None, 3, 4096])), **common), MistralForCausalLM
    return LlamaConfig(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()), **common), LlamaForCausalLM


# ---- random valid plans -----------------------------------------------------------------------
@st.composite
def head_removal(draw, n_q: int, n_kv: int) -> tuple[list[int], list[int]]:
    """(query heads, KV groups) to remove from one layer, keeping equal group sizes.

    Whole groups go either through ``kv_groups`` or by listing all their query heads; every
    group that stays loses the same number of query heads, and at least one group stays.
    """
    group = n_q // n_kv
    gone_groups = draw(st.sets(st.integers(0, n_kv - 1), max_size=n_kv - 1))
    alive = [g for g in range(n_kv) if g not in gone_groups]
    whole_by_heads = draw(st.sets(st.sampled_from(alive), max_size=len(alive) - 1)) if len(alive) > 1 else set()
    staying = [g for g in alive if g not in whole_by_heads]
    per_group = draw(st.integers(0, group - 1))
    heads = [h for g in sorted(whole_by_heads) for h in range(g * group, (g + 1) * group)]
    for g in staying:
        heads += draw(st.permutations(range(g * group, (g + 1) * group)))[:per_group]
    return draw(st.permutations(heads)), draw(st.permutations(sorted(gone_groups)))


@st.composite
def plans(draw, n_layers: int, n_q: int, n_kv: int, intermediate: int) -> PruningPlan:
    layers = draw(st.sets(st.integers(0, n_layers - 1), max_size=n_layers - 1))
    heads, kv_groups, neurons = {}, {}, {}
    for layer in range(n_layers):
        if layer in layers:
            continue
        if draw(st.booleans()):
            h, g = draw(head_removal(n_q, n_kv))
            if h:
                heads[layer] = h
            if g:
                kv_groups[layer] = g
        if draw(st.booleans()):
            neurons[layer] = draw(st.lists(st.integers(0, intermediate - 1), min_size=1, max_size=intermediate - 1,
                                           unique=True))
    return PruningPlan(heads=heads, kv_groups=kv_groups, neurons=neurons,
                       layers=draw(st.permutations(sorted(layers))))


# ---- the reference: dense model with the removed contributions zeroed -------------------------
def _removed_query_heads(plan: PruningPlan, layer: int, n_q: int, n_kv: int) -> set[int]:
    group = n_q // n_kv
    gone = set(plan.heads.get(layer, []))
    for g in plan.kv_groups.get(layer, []):
        gone |= set(range(g * group, (g + 1) * group))
    return gone


def _zero_input_columns(linear: torch.nn.Linear, columns: list[int]) -> None:
    if columns:
        linear.weight[:, torch.tensor(columns)] = 0.0


def _identity_hook(module, args, output):
    return args[0]  # a BERT layer returns its hidden states as a plain tensor in transformers 5


def reference_model(model, plan: PruningPlan):
    """A deep copy of dense ``model`` that computes what ``apply_plan`` promises, adapters unused."""
    ref = copy.deepcopy(model)
    cfg = ref.config
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    is_bert = cfg.model_type in ("bert", "roberta")
    blocks = ref.base_model.encoder.layer if is_bert else ref.base_model.layers
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            if is_bert:
                o_proj, down_proj, head_dim = block.attention.output.dense, block.output.dense, cfg.hidden_size // n_q
            else:
                o_proj, down_proj, head_dim = block.self_attn.o_proj, block.mlp.down_proj, cfg.head_dim
            gone = _removed_query_heads(plan, layer, n_q, n_kv)
            _zero_input_columns(o_proj, [h * head_dim + d for h in sorted(gone) for d in range(head_dim)])
            _zero_input_columns(down_proj, sorted(plan.neurons.get(layer, [])))
            if layer in plan.layers:
                if is_bert:  # post-LN block: zeroing cannot make it an identity, so bypass it
                    block.register_forward_hook(_identity_hook)
                else:  # pre-norm block: h + o_proj(.) + down_proj(.) with both at zero is h exactly
                    for linear in (o_proj, down_proj):
                        linear.weight.zero_()
                        if linear.bias is not None:
                            linear.bias.zero_()
    return ref


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(seed: int, seq: int, left_pad: bool):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    pad = int(torch.randint(1, seq, (1,), generator=gen))  # row 1 is padded, row 0 is not
    if left_pad:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    else:
        mask[1, seq - pad:] = 0
    return ids, mask


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest difference on real positions, in units of the outputs' scale once that exceeds 1.

    Sliced and zeroed models sum the same terms in a different order, so float32 rounding grows
    with the size of the outputs (hypothesis found logits near 10 differing by 1.2e-5).
    """
    keep = mask.bool()  # padded query positions carry no meaning (and may be NaN under sdpa)
    scale = max(1.0, b[keep].abs().max().item())
    return (a[keep] - b[keep]).abs().max().item() / scale


# ---- the property ------------------------------------------------------------------------------
def _events(model, plan: PruningPlan) -> None:
    """Shown by ``pytest --hypothesis-show-statistics``: which kinds of plans were drawn."""
    event(f"attn={model.config._attn_implementation}")
    event(f"removes layers: {bool(plan.layers)}")
    event(f"removes whole KV groups: {any(plan.kv_groups.values())}")
    event(f"removes query heads: {any(plan.heads.values())}")
    event(f"removes neurons: {any(plan.neurons.values())}")


def check_exact(model, plan: PruningPlan, seed: int, seq: int) -> None:
    """Prune ``model`` in place with ``plan`` and compare it with the zeroed reference.

    ``model`` is drawn afresh for every example, so it is pruned itself rather than a copy: the
    reference is the one deep copy needed (each costs about two forward passes of the model).
    Everything read from the dense model is read before the surgery.
    """
    model.eval()
    _events(model, plan)
    assert PruningPlan.from_json(plan.to_json()) == plan
    assert PruningPlan.from_json(plan.to_json(indent=None)) == plan
    ref = reference_model(model, plan)
    before, dense_layers = n_params(model), before_layers(model)
    expected_removed = parameters_removed(model, plan)
    decoder = hasattr(model, "generate") and not model.config.model_type.startswith(("bert", "roberta"))
    pruned = apply_plan(model, plan)
    assert before - n_params(pruned) == expected_removed
    assert len(pruned.config.layer_shapes) == pruned.config.num_hidden_layers == dense_layers - len(plan.layers)

    ids, mask = _inputs(seed, seq, left_pad=decoder)
    # inference_mode: no_grad without version counters, a sixth off every forward and generate step
    with torch.inference_mode():
        if decoder:
            got, want = pruned(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        else:
            got = pruned(ids, attention_mask=mask).last_hidden_state
            want = ref(ids, attention_mask=mask).last_hidden_state
        diff = _max_abs_diff(got, want, mask)
        assert diff <= ATOL, f"max abs diff {diff:.3g} > {ATOL} for plan {plan.to_json(indent=None)}"
        if decoder:
            kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            out_pruned = pruned.generate(ids, **kwargs)
            out_ref = ref.generate(ids, **kwargs)
            assert torch.equal(out_pruned, out_ref), f"greedy tokens differ for plan {plan.to_json(indent=None)}"


def before_layers(model) -> int:
    return model.config.num_hidden_layers if not hasattr(model.config, "layer_shapes") else len(model.config.layer_shapes)


def _case(draw, family: str):
    config, cls = draw(encoder_configs(family) if family in ("bert", "roberta") else decoder_configs(family))
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    plan = draw(plans(config.num_hidden_layers, config.num_attention_heads, n_kv, config.intermediate_size))
    seed, seq = draw(st.integers(0, 2**31 - 1)), draw(st.integers(3, 10))
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # norms start at ones; random ones show whether head surgery leaves them right
        for name, module in model.named_modules():
            if name.endswith(("q_norm", "k_norm")):
                module.weight.uniform_(0.5, 1.5)
    return model, plan, seed, seq


@pytest.mark.parametrize("family", ["bert", "llama_mha", "llama_gqa", "llama_mqa", "qwen2", "qwen3", "mistral"])
@PROPERTY
@given(data=st.data())
def test_surgery_matches_zeroed_reference(family, data):
    model, plan, seed, seq = _case(data.draw, family)
    check_exact(model, plan, seed, seq)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_surgery_matches_zeroed_reference_roberta(data):
    model, plan, seed, seq = _case(data.draw, "roberta")
    check_exact(model, plan, seed, seq)


# ---- fixed models for the plain tests -----------------------------------------------------------
def tiny_llama(n_layers=3, n_q=6, n_kv=2, intermediate=20, seed=0, **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=intermediate, num_hidden_layers=n_layers,
                         num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, **extra)
    return LlamaForCausalLM(config).eval()


def tiny_bert(n_layers=3, n_heads=4, intermediate=20, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                        intermediate_size=intermediate, max_position_embeddings=32, initializer_range=0.2)
    return BertModel(config).eval()


def test_reference_is_sensitive():
    """Guards the property test itself: pruning does change outputs well above the tolerance."""
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    plan = PruningPlan(heads={0: [0, 3]}, neurons={1: [4, 5]})
    with torch.no_grad():
        dense = model(ids).logits
        pruned = apply_plan(copy.deepcopy(model), plan)(ids).logits
        wrong = apply_plan(copy.deepcopy(model), PruningPlan(heads={0: [1, 4]}, neurons={1: [4, 6]}))(ids).logits
    assert (dense - pruned).abs().max() > 1e-3
    assert (wrong - pruned).abs().max() > 1e-3


def test_surgery_leaves_global_rng_alone():
    """Surgery copies weights; it must not draw random numbers (it once built each new Linear with
    a throwaway random init, which shifted every later seeded draw of the caller)."""
    model = tiny_llama()
    state = torch.get_rng_state()
    apply_plan(model, PruningPlan(heads={0: [1, 4]}, kv_groups={1: [0]}, neurons={1: [0, 5]}, layers=[2]))
    assert torch.equal(torch.get_rng_state(), state)


# ---- bad plans --------------------------------------------------------------------------------
def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot) -> None:
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, value in snapshot.items():
        assert state[key].shape == value.shape, key
        assert torch.equal(state[key], value), key
    assert not type(model).__name__.startswith("Pruned")
    assert not hasattr(model.config, "layer_shapes")


# (plan, words the message must contain). tiny_llama: 3 layers, 6 query heads, 2 KV groups of 3, 20 neurons.
BAD_LLAMA_PLANS = [
    (PruningPlan(heads={1: [6]}), ["heads", "layer 1", "[6]", "out of range"]),
    (PruningPlan(heads={1: [-1]}), ["heads", "layer 1", "out of range"]),
    (PruningPlan(heads={1: [0, 3, 0, 3]}), ["heads", "layer 1", "duplicate", "[0, 3]"]),
    (PruningPlan(heads={2: list(range(6))}), ["heads", "layer 2", "0 of 6"]),
    (PruningPlan(kv_groups={2: [0]}, heads={2: [3, 4, 5]}), ["heads", "layer 2", "0 of 6"]),
    (PruningPlan(heads={0: [0, 1]}), ["heads", "layer 0", "unequal"]),
    (PruningPlan(heads={0: [0, 3, 4]}), ["heads", "layer 0", "unequal"]),
    (PruningPlan(kv_groups={1: [0, 1]}), ["layer 1", "0 of 6"]),
    (PruningPlan(kv_groups={1: [2]}), ["kv_groups", "layer 1", "[2]", "out of range"]),
    (PruningPlan(kv_groups={1: [1, 1]}), ["kv_groups", "layer 1", "duplicate"]),
    (PruningPlan(kv_groups={0: [1]}, heads={0: [4]}), ["layer 0", "[4]", "KV groups are removed"]),
    (PruningPlan(kv_groups={0: [0]}, heads={0: [3]}, layers=[0]), ["layer 0", "removed whole"]),
    (PruningPlan(neurons={2: [20]}), ["neurons", "layer 2", "[20]", "out of range"]),
    (PruningPlan(neurons={2: [5, 5]}), ["neurons", "layer 2", "duplicate", "[5]"]),
    (PruningPlan(neurons={0: list(range(20))}), ["neurons", "layer 0", "0 of 20"]),
    (PruningPlan(layers=[0, 1, 2]), ["layers", "all 3 layers"]),
    (PruningPlan(layers=[3]), ["layers", "[3]", "out of range"]),
    (PruningPlan(layers=[1, 1]), ["layers", "duplicate", "[1]"]),
    (PruningPlan(heads={1: [0, 3]}, layers=[1]), ["heads", "layer 1", "removed whole"]),
    (PruningPlan(neurons={2: [0]}, layers=[2]), ["neurons", "layer 2", "removed whole"]),
    (PruningPlan(heads={5: [0]}), ["heads", "[5]", "out of range"]),
    (PruningPlan(neurons={-1: [0]}), ["neurons", "[-1]", "out of range"]),
    # a valid first part must not be applied before the bad last part is found
    (PruningPlan(heads={0: [0, 3]}, neurons={0: [1], 2: [99]}, layers=[1]), ["neurons", "layer 2", "[99]"]),
]


BAD_BERT_PLANS = [
    (PruningPlan(heads={0: [0, 1, 2, 3]}), ["heads", "layer 0", "0 of 4"]),
    (PruningPlan(heads={2: [4]}), ["heads", "layer 2", "[4]", "out of range"]),
    (PruningPlan(neurons={1: list(range(20))}), ["neurons", "layer 1", "0 of 20"]),
    (PruningPlan(layers=[2, 0, 1]), ["layers", "all 3"]),
]


BAD_PLANS = [(tiny_llama, plan, words) for plan, words in BAD_LLAMA_PLANS] + \
            [(tiny_bert, plan, words) for plan, words in BAD_BERT_PLANS]


@pytest.mark.parametrize("build,plan,words", BAD_PLANS,
                         ids=[f"{build.__name__}:{w[0]}:{w[-1]}" for build, _, w in BAD_PLANS])
def test_bad_plan_names_layer_and_problem_and_leaves_model_unchanged(build, plan, words):
    model = build()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as info:
        apply_plan(model, plan)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    with pytest.raises(ValueError):
        parameters_removed(model, plan)
    _assert_unchanged(model, snapshot)


def test_unknown_json_key_is_named():
    with pytest.raises(ValueError, match="unknown keys.*'head'"):
        PruningPlan.from_json('{"head": {"0": [1]}, "layers": []}')
    with pytest.raises(ValueError, match="neuron"):
        PruningPlan.from_dict({"neuron": {}})


def test_json_round_trip_is_canonical():
    plan = PruningPlan(heads={"2": [5, 1]}, kv_groups={0: [1]}, neurons={1: [9, 3, 4]}, layers=[3, 0])
    text = plan.to_json()
    assert PruningPlan.from_json(text) == plan
    assert PruningPlan.from_json(text).to_json() == text
    assert PruningPlan(heads={0: []}) == PruningPlan()


def test_unsupported_model_lists_supported_families():
    model = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as info:
        apply_plan(model, PruningPlan(layers=[0]))
    message = str(info.value)
    assert "gpt2" in message and "supported" in message
    for name in ("bert", "roberta", "llama", "mistral", "qwen2", "qwen3"):
        assert name in message
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


# ---- pruning twice ----------------------------------------------------------------------------
def _compose(first: PruningPlan, second: PruningPlan, n_layers: int, n_q: int, n_kv: int, inter: int) -> PruningPlan:
    """The single plan, in the dense numbering, equivalent to ``first`` then ``second``."""
    group = n_q // n_kv
    kept_layers = [i for i in range(n_layers) if i not in first.layers]
    heads, neurons = {}, {}
    for new, old in enumerate(kept_layers):
        gone = _removed_query_heads(first, old, n_q, n_kv)
        kept_q = [h for h in range(n_q) if h not in gone]
        kept_groups = len({h // group for h in kept_q})
        heads[old] = sorted(gone | {kept_q[h] for h in _removed_query_heads(second, new, len(kept_q), kept_groups)})
        first_gone = set(first.neurons.get(old, []))
        kept_n = [n for n in range(inter) if n not in first_gone]
        neurons[old] = sorted(first_gone | {kept_n[n] for n in second.neurons.get(new, [])})
    layers = sorted(set(first.layers) | {kept_layers[i] for i in second.layers})
    for layer in layers:
        heads.pop(layer, None)
        neurons.pop(layer, None)
    return PruningPlan(heads=heads, neurons=neurons, layers=layers)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_pruning_twice_stays_exact(family):
    if family == "llama":
        model = tiny_llama(n_layers=4, n_q=6, n_kv=2)  # KV groups: heads {0, 1, 2} and {3, 4, 5}
        first = PruningPlan(heads={0: [0, 4]}, kv_groups={1: [0]}, neurons={0: [0, 1, 2], 3: [7]}, layers=[2])
        # now: layer 0 = old 0 (heads 1,2 | 3,5), layer 1 = old 1 (heads 3,4,5), layer 2 = old 3 (dense)
        second = PruningPlan(heads={0: [1, 3]}, kv_groups={2: [1]}, neurons={0: [0, 16], 2: [3]}, layers=[1])
        n_q, n_kv = 6, 2
    else:
        model = tiny_bert(n_layers=4, n_heads=4)
        first = PruningPlan(heads={0: [1], 1: [0, 3]}, neurons={2: list(range(10))}, layers=[3])
        second = PruningPlan(heads={0: [0, 2], 1: [1]}, neurons={2: [0, 9]})
        n_q = n_kv = 4
    dense = copy.deepcopy(model)
    n_layers, inter = model.config.num_hidden_layers, model.config.intermediate_size

    removed_first = parameters_removed(model, first)
    before = n_params(model)
    apply_plan(model, first)
    assert before - n_params(model) == removed_first
    removed_second = parameters_removed(model, second)  # counted in the pruned model's numbering
    apply_plan(model, second)
    assert before - n_params(model) == removed_first + removed_second
    assert type(model).__name__.startswith("Pruned")
    assert len(model.config.layer_shapes) == model.config.num_hidden_layers == n_layers - 2 + (family == "bert")

    combined = _compose(first, second, n_layers, n_q, n_kv, inter)
    assert parameters_removed(dense, combined) == removed_first + removed_second
    once = apply_plan(copy.deepcopy(dense), combined)
    assert once.config.layer_shapes == model.config.layer_shapes
    ref = reference_model(dense, combined)
    ids, mask = _inputs(3, 9, left_pad=family == "llama")
    with torch.no_grad():
        if family == "llama":
            got, want, one = (m(ids, attention_mask=mask).logits for m in (model, ref, once))
        else:
            got, want, one = (m(ids, attention_mask=mask).last_hidden_state for m in (model, ref, once))
    assert _max_abs_diff(got, want, mask) <= ATOL
    assert _max_abs_diff(got, one, mask) <= ATOL
    if family == "llama":
        kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))


@pytest.mark.parametrize("data,message", [
    ({"layers": 3}, "layers must be a list of integer indices, got 3"),
    ({"layers": [1.5]}, "layers: index 1.5 is not an integer"),
    ({"heads": {"0": [True]}}, r"heads\[0\]: index True is not an integer"),
    ({"neurons": [1, 2]}, r"neurons must be a mapping \{layer: \[indices\]\}, got list"),
    ({"heads": {"x": [1]}}, "heads: index 'x' is not an integer"),
])
def test_malformed_plan_json_is_a_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan.from_dict(data)
