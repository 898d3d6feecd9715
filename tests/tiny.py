"""Tiny random models and token ids shared by the tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=24, max_position_embeddings=32, initializer_range=0.2)
    return BertModel(config).eval()


def calib(seed: int = 1, n: int = 6, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def token_ids(n: int, t: int, seed: int, vocab: int = 128) -> torch.Tensor:
    """[n, t] random token ids from a seeded generator."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def louder_channels(model: LlamaForCausalLM, count: int) -> LlamaForCausalLM:
    """The first ``count`` hidden channels 20x louder after every norm: the salient input channels
    AWQ exists to protect (random weights alone have none)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:count] *= 20
            layer.post_attention_layernorm.weight[:count] *= 20
    return model


def wide_llama(seed=0):
    """A tiny Llama whose widths allow alignment to 8: 4 layers, 4 query / 2 KV heads of 8, FFN 32."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def weights_digest(model) -> str:
    """sha256 of every tensor of the state dict in key order: equal digests, identical weights."""
    import hashlib

    return hashlib.sha256(b"".join(v.detach().contiguous().numpy().tobytes()
                                   for _, v in sorted(model.state_dict().items()))).hexdigest()
