"""Quantization after pruning, on tiny models: AWQ INT4 and torchao int8 stay close to fp32."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from course_lib.plan import PruningPlan
from course_lib.quantize import awq_int4, check_group_size, int8_dynamic
from course_lib.surgery import apply_plan


def _pruned_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    return apply_plan(model, PruningPlan(kv_groups={0: [1]}, neurons={1: list(range(64))}))


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_awq_int4_logits_stay_close_to_fp32():
    model = _pruned_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
        awq_int4(model, calib, group_size=64)
        quantized = model(ids).logits
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "WQLinear_GEMM"
    # Stated tolerance: 25% relative logit error. Random Gaussian weights are the worst case for 4 bits
    # (no outlier channels for AWQ to protect); measured here: 18.5%.
    assert 0 < _relative_error(quantized, reference) < 0.25
    with pytest.raises(ValueError, match="prune first, then quantize"):
        apply_plan(model, PruningPlan(layers=[0]))


def test_int8_dynamic_logits_stay_close_to_fp32():
    model = _pruned_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        int8_dynamic(model)
        quantized = model(ids).logits
    assert 0 < _relative_error(quantized, reference) < 0.05
    with pytest.raises(ValueError, match="already quantized"):
        int8_dynamic(model)


def test_group_size_must_divide_every_pruned_width():
    model = _pruned_llama()  # widths: hidden 256, layer 0 attention 2 x 64 = 128, layer 1 FFN 192
    check_group_size(model, 64)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the input width 192 of layer 1 mlp.down_proj"):
        check_group_size(model, 128)
    apply_plan(model, PruningPlan(neurons={0: list(range(10))}))
    with pytest.raises(ValueError, match=r"output width 246 of layer 0 mlp.gate_proj is not a multiple of 64"):
        check_group_size(model, 2)
    with pytest.raises(ValueError, match="calib must be"):
        awq_int4(model, torch.zeros(4, dtype=torch.long))


def test_awq_refuses_encoders():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=128))
    with pytest.raises(ValueError, match="Llama family"):
        awq_int4(model, torch.zeros(2, 8, dtype=torch.long))
