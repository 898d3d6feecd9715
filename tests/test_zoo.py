"""The embedded models load offline, behave like the released models, and fail clearly otherwise."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from course_lib import zoo

PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def decoder() -> tuple:
    """Loaded once for the module; converts the GGUF on the first run of a fresh cache."""
    return zoo.load_decoder("smollm2-135m")


@pytest.fixture(scope="module")
def encoder() -> tuple:
    return zoo.load_encoder("minilm-l6")


def greedy(model, tokenizer, inputs, max_new_tokens: int) -> list[int]:
    """The generated token ids only, greedy decoding."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_decoder_is_the_tied_llama_in_eval_mode(decoder) -> None:
    model, tokenizer = decoder
    assert isinstance(model, zoo.LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id


@pytest.mark.slow
def test_greedy_continuation_is_deterministic_and_fluent(decoder) -> None:
    model, tokenizer = decoder
    inputs = tokenizer(PROMPT, return_tensors="pt")
    first = greedy(model, tokenizer, inputs, max_new_tokens=20)
    assert greedy(model, tokenizer, inputs, max_new_tokens=20) == first
    assert "Paris" in tokenizer.decode(first)
    assert len(set(first)) >= len(first) // 2, "degenerate repetition"


@pytest.mark.slow
def test_chat_answer_names_paris_and_stops_at_eos(decoder) -> None:
    model, tokenizer = decoder
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    answer = greedy(model, tokenizer, inputs, max_new_tokens=30)
    assert answer[-1] == tokenizer.eos_token_id and len(answer) < 30
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


@pytest.mark.slow
def test_second_decoder_load_is_fast(decoder) -> None:
    start = time.perf_counter()
    model, _ = zoo.load_decoder("smollm2-135m")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"reload took {elapsed:.1f} s"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, decoder[0].model.layers[0].self_attn.q_proj.weight)


@pytest.mark.slow
def test_minilm_puts_a_paraphrase_closer_than_an_unrelated_sentence(encoder) -> None:
    model, tokenizer = encoder
    assert isinstance(model, zoo.BertModel) and not model.training
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    emb = zoo.mean_pooled_embeddings(model, tokenizer, texts, batch_size=2)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    paraphrase, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert paraphrase > 0.6 and unrelated < 0.2


@pytest.mark.slow
def test_classifier_has_fresh_head_on_the_same_encoder(encoder) -> None:
    classifier, _ = zoo.load_encoder_classifier("minilm-l6", num_labels=2)
    assert classifier.config.num_labels == 2 and classifier.classifier.out_features == 2
    plain = encoder[0].state_dict()
    loaded = classifier.bert.state_dict()
    assert loaded.keys() == plain.keys()
    assert all(torch.equal(loaded[key], plain[key]) for key in plain)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"name='gpt-5'.*\['smollm2-135m'\]"):
        zoo.load_decoder("gpt-5")
    with pytest.raises(ValueError, match=r"name='smollm2-135m'.*\['minilm-l6'\]"):
        zoo.load_encoder("smollm2-135m")


@pytest.mark.parametrize(
    ("loader", "hub_id"),
    [(zoo.load_decoder, "meta-llama/Llama-3.2-1B"), (zoo.load_encoder_classifier, "google-bert/bert-base-uncased")],
)
def test_offline_hub_id_names_the_embedded_alternatives(loader, hub_id: str) -> None:
    with pytest.raises(zoo.ModelUnavailableError, match="minilm-l6.*smollm2-135m") as caught:
        loader(hub_id)
    assert hub_id in str(caught.value) and caught.value.__cause__ is None


def test_missing_gguf_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("COURSE_PROFILE", "ci")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install gguf==0\.19\.0.*hub id"):
        zoo.load_decoder()  # the profile's decoder: smollm2-135m, not converted in this cache
    assert not zoo.converted_dir("smollm2-135m").exists()


def test_crashed_conversion_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A crash after the weights are written, before the tokenizer is, must not look converted."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))

    def write_weights(directory) -> None:
        directory.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (directory / name).write_text("{}")

    config = SimpleNamespace(eos_token_id=2, pad_token_id=2, max_position_embeddings=8)
    model = SimpleNamespace(config=config, save_pretrained=write_weights)
    tokenizer = mock.MagicMock(save_pretrained=mock.Mock(side_effect=KeyboardInterrupt))
    monkeypatch.setattr(zoo, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=lambda *a, **k: model))
    monkeypatch.setattr(zoo, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer))
    with pytest.raises(KeyboardInterrupt):
        zoo.prepare_decoder("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_lean_gguf_parsing_reads_the_same_fields_and_tensors_and_puts_gguf_back():
    import gguf
    import numpy as np
    from gguf import GGUFReader, gguf_reader

    path = zoo.wheel_file(zoo.DECODERS["smollm2-135m"])
    numpy, name_map = gguf_reader.np, gguf.get_tensor_name_map
    mapped = GGUFReader(path)
    with zoo._lean_gguf_parsing():
        lean = GGUFReader(path)
        assert not isinstance(lean.data, np.memmap)   # the file's bytes, read into memory
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is first   # built once
    assert gguf_reader.np is numpy and gguf.get_tensor_name_map is name_map
    assert list(lean.fields) == list(mapped.fields)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.block_count"):
        assert lean.fields[key].contents() == mapped.fields[key].contents()
    assert [t.name for t in lean.tensors] == [t.name for t in mapped.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(lean.tensors[:8], mapped.tensors[:8]))
