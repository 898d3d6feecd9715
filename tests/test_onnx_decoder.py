"""onnx_decoder: the graph written from a (pruned, quantized) Llama computes what the model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from course_lib import lowbit, onnx_decoder, quantize, timing
from course_lib.errors import SettingError
from course_lib.onnx_decoder import FLOAT_ACTIVATIONS, INT8_ACTIVATIONS, OrtDecoder
from course_lib.plan import PruningPlan
from course_lib.surgery import apply_plan


def _pruned_llama(**config) -> LlamaForCausalLM:
    """Three blocks of different shapes after surgery: 4, 2 and 4 heads over 2, 1 and 2 KV groups, FFN 128, 64, 128."""
    torch.manual_seed(0)
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, initializer_range=0.2, tie_word_embeddings=True)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    return apply_plan(model, PruningPlan(kv_groups={1: [0]}, neurons={1: list(range(64))}))


def _ids(batch: int, seq: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_fp32_graph_gives_the_models_logits_with_and_without_its_kv_cache():
    model = _pruned_llama()
    assert [b.self_attn.k_proj.out_features for b in model.model.layers] == [32, 16, 32]  # non-uniform
    ort, ids = OrtDecoder(model), _ids(2, 9)
    with torch.no_grad():
        expected = model(ids).logits
        whole = ort(ids).logits
        first = ort(ids[:, :6], use_cache=True)
        rest = ort(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert whole.shape == expected.shape
    torch.testing.assert_close(whole, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), expected, atol=2e-5, rtol=1e-4)
    assert ort(ids).past_key_values is None  # a cache only when asked for


def _fake_quantized(model: LlamaForCausalLM, packed: LlamaForCausalLM) -> LlamaForCausalLM:
    """``model`` in fp32 holding the values ``packed`` (from ``quantize.int4``) stands for: each weight on its
    grid, ``(level - zero) * scale`` with the integer zero point, and the norms rounded to bf16 as ``packed`` keeps them."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in packed.named_modules():
            if isinstance(layer, lowbit.Int4Linear):
                scale, offset = layer.scales_and_zeros.float().repeat_interleave(layer.group_size, 0).unbind(-1)
                zero = torch.round(8 - offset / scale)
                reference.get_submodule(name).weight.copy_((layer.levels().float() - zero.t()) * scale.t())
            elif name.endswith("norm"):
                reference.get_submodule(name).weight.copy_(layer.weight.float())
        head = packed.get_output_embeddings()
        reference.get_output_embeddings().weight.copy_(head.qweight.float() * head.scales.float()[:, None])
    return reference


def test_int4_graph_computes_the_fake_quantised_model():
    model = _pruned_llama()
    packed = quantize.int4(copy.deepcopy(model), None, group_size=32)
    reference, ids = _fake_quantized(model, packed), _ids(1, 12)
    with torch.no_grad():
        expected = reference(ids).logits
        exact = OrtDecoder(packed, FLOAT_ACTIVATIONS)(ids).logits
        fast = OrtDecoder(packed, INT8_ACTIVATIONS)(ids).logits
        plain = model(ids).logits
    # fp32 activations: the same weights, only the order of the sums differs
    torch.testing.assert_close(exact, expected, atol=1e-4, rtol=1e-4)
    # int8 activation blocks: within 5% of the logits' range, far closer than the unquantized model
    spread = (expected.max() - expected.min()).item()
    assert (fast - expected).abs().max() < 0.05 * spread
    assert (fast - expected).abs().max() < 0.5 * (plain - expected).abs().max()


def test_the_session_decodes_in_timing_compare():
    model = _pruned_llama()
    results = timing.compare({"fp32": model, "onnx": OrtDecoder(model)}, seq=8, new_tokens=3, rounds=1)
    assert results["onnx"]["decode_tokens_per_s"] > 0 and len(results["onnx"]["decode_step_ms"]) == 3


def test_what_the_graph_cannot_hold_is_a_named_error():
    bert = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(SettingError, match="Llama-family decoders .* not the bert family"):
        OrtDecoder(bert)
    scaled = _pruned_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(SettingError, match="not rope_type='linear'"):
        OrtDecoder(scaled)
    with pytest.raises(SettingError, match="not a bf16 cast"):
        OrtDecoder(quantize.bf16(_pruned_llama()))
    with pytest.raises(SettingError, match="activations must be INT8_ACTIVATIONS"):
        OrtDecoder(_pruned_llama(), activations=2)
    assert onnx_decoder.unsupported(_pruned_llama()) is None
    ort = OrtDecoder(_pruned_llama())
    mask = torch.ones(1, 4, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(SettingError, match="without padding"):
        ort(_ids(1, 4), attention_mask=mask)
