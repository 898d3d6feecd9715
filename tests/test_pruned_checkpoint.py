"""A pruned model saves as safetensors + config + code, and reloads bit-identically.

(a) in this process, where importing ``course_lib`` registers the ``pruned_*`` model types, and in a
    fresh process that imports nothing of the package but ``course_lib`` itself;
(b) in a fresh Python process that cannot import ``course_lib`` at all, through
    ``AutoModel*.from_pretrained(dir, trust_remote_code=True)`` and the ``pruned_modeling.py``
    copied beside the weights; without ``trust_remote_code`` the error says to pass it;
(c) the same for the embedded SmolLM2-135M and MiniLM-L6, pruned non-uniformly (slow).

Every comparison is ``torch.equal``: the reloaded model runs the same kernels on the same
weights, so anything short of bit-identical means a shape, an order or a weight changed. Both
processes use one torch thread, so that even the reduction order is the same.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

import course_lib
from course_lib.plan import PruningPlan
from course_lib.reconstruction import prune_and_reconstruct
from course_lib.surgery import apply_plan, parameters_removed

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
AUTO = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
        "AutoModelForSequenceClassification": AutoModelForSequenceClassification}

# Runs in a fresh interpreter. ``sys.modules["course_lib"] = None`` makes any import of course_lib
# fail, as for a user who only has transformers: the pruned classes must come from the copied file.
# Every load without trust_remote_code comes first: once one checkpoint's pruned_modeling.py is
# imported, it registers all pruned_* types with the Auto classes for the rest of the process.
FRESH_CHECK = r'''
import json, sys
sys.modules["course_lib"] = None
import torch
import transformers
from safetensors.torch import load_file

torch.set_num_threads(1)
jobs, verdict_file = json.loads(sys.argv[1]), sys.argv[2]
verdicts = {job["name"]: {} for job in jobs}
for job in jobs:
    try:
        getattr(transformers, job["auto"]).from_pretrained(job["dir"])
        verdicts[job["name"]]["without_trust"] = "loaded"
    except Exception as err:
        verdicts[job["name"]]["without_trust"] = f"{type(err).__name__}: {err}"
for job in jobs:
    verdict = verdicts[job["name"]]
    model = getattr(transformers, job["auto"]).from_pretrained(job["dir"], trust_remote_code=True).eval()
    verdict["class"] = type(model).__name__
    verdict["module"] = type(model).__module__
    verdict["dtype"] = str(model.dtype)
    verdict["params"] = sum(p.numel() for p in model.parameters())
    verdict["layer_shapes"] = model.config.layer_shapes
    t = load_file(job["tensors"])
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    got = getattr(out, job["output"])
    verdict["output_equal"] = bool(got.shape == t["expected"].shape and torch.equal(got, t["expected"]))
    if "generated" in t:
        tokens = model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], do_sample=False,
                                max_new_tokens=job["new_tokens"], pad_token_id=job["pad_token_id"])
        verdict["generate_equal"] = bool(tokens.shape == t["generated"].shape and torch.equal(tokens, t["generated"]))
    del model
verdict_course_lib = any(name.startswith("course_lib") and mod is not None for name, mod in sys.modules.items())
for verdict in verdicts.values():
    verdict["course_lib_imported"] = verdict_course_lib
with open(verdict_file, "w") as handle:
    json.dump(verdicts, handle)
print("verdicts written")
'''


# Runs in a fresh interpreter too: ``import course_lib`` and transformers' Auto classes, nothing else of the
# package. The pruned classes must come from course_lib's registration, not from the copied file.
REGISTERED_CHECK = r'''
import json, sys
import course_lib
light = sorted({"torch", "transformers"} & set(sys.modules))
import torch
import transformers
from safetensors.torch import load_file

torch.set_num_threads(1)
jobs, verdict_file = json.loads(sys.argv[1]), sys.argv[2]
verdicts = {}
for job in jobs:
    model = getattr(transformers, job["auto"]).from_pretrained(job["dir"]).eval()
    t = load_file(job["tensors"])
    with torch.no_grad():
        got = getattr(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]), job["output"])
    verdicts[job["name"]] = {"class": type(model).__name__, "module": type(model).__module__,
                             "output_equal": bool(got.shape == t["expected"].shape and torch.equal(got, t["expected"])),
                             "heavy_after_import": light}
with open(verdict_file, "w") as handle:
    json.dump(verdicts, handle)
'''


def run_fresh(jobs: list[dict], workdir: Path, timeout: int = 300, script: str = FRESH_CHECK) -> dict[str, dict]:
    """Check ``jobs`` in a new interpreter running ``script``; return one verdict per job.

    The interpreter finds this checkout's course_lib (``PYTHONPATH``), which ``FRESH_CHECK`` then blocks.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "hf_modules"),
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(course_lib.__file__).resolve().parent.parent)}
    verdict_file = workdir / "verdicts.json"
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs), str(verdict_file)], cwd=workdir,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and verdict_file.is_file(), (
        f"fresh process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(verdict_file.read_text())


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- saving one pruned model: directory, inputs and expected outputs -----------------------------
class Saved:
    """A pruned model saved to ``dir`` with its inputs and outputs in ``tensors.safetensors``."""

    def __init__(self, name, model, dense_params, removed, auto, output, input_ids, attention_mask, root,
                 new_tokens=0, pad_token_id=None):
        self.name, self.model, self.auto, self.output = name, model, auto, output
        self.dense_params, self.removed = dense_params, removed
        self.dir = root / name
        self.tensors = root / f"{name}.tensors.safetensors"
        self.new_tokens, self.pad_token_id = new_tokens, pad_token_id
        model.save_pretrained(self.dir)
        with torch.no_grad():
            expected = getattr(model(input_ids=input_ids, attention_mask=attention_mask), output)
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "expected": expected.contiguous()}
        if new_tokens:
            tensors["generated"] = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                                  max_new_tokens=new_tokens, pad_token_id=pad_token_id)
        self.expected = tensors
        save_file(tensors, str(self.tensors))

    def job(self) -> dict:
        return {"name": self.name, "dir": str(self.dir), "auto": self.auto, "tensors": str(self.tensors),
                "output": self.output, "new_tokens": self.new_tokens, "pad_token_id": self.pad_token_id}


def prune_and_save(name, model, plan, auto, output, input_ids, attention_mask, root, **gen) -> Saved:
    model.eval()
    dense_params, removed = n_params(model), parameters_removed(model, plan)
    apply_plan(model, plan)
    assert dense_params - n_params(model) == removed
    return Saved(name, model, dense_params, removed, auto, output, input_ids, attention_mask, root, **gen)


def reconstruct_and_save(name, model, plan, seed, root) -> Saved:
    """``prune_and_save`` with reconstruction: refitted weights and biases the stock model lacks."""
    model.eval()
    dense = n_params(model)
    calib = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed + 7))
    prune_and_reconstruct(model, plan, calib, progress=False)
    return Saved(name, model, dense, dense - n_params(model), "AutoModelForCausalLM", "logits",
                 *_ids(seed, 2, 9, left_pad=True), root, new_tokens=5, pad_token_id=0)


def check_directory(saved: Saved) -> dict:
    files = {p.name for p in saved.dir.iterdir()}
    assert {"model.safetensors", "config.json", "pruned_modeling.py"} <= files, files
    pickles = [p for p in saved.dir.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickle files in a pruned checkpoint: {pickles}"
    config = json.loads((saved.dir / "config.json").read_text())
    assert config["model_type"].startswith("pruned_")
    assert config["layer_shapes"] == saved.model.config.layer_shapes
    assert len(config["layer_shapes"]) == config["num_hidden_layers"]
    assert config["auto_map"][saved.auto].startswith("pruned_modeling.Pruned")
    # the copied code must not need course_lib
    code = (saved.dir / "pruned_modeling.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+(course_lib|\.)", code, re.MULTILINE)
    return config


def check_fresh_verdict(saved: Saved, verdict: dict) -> None:
    assert not verdict["course_lib_imported"]
    assert verdict["module"].startswith("transformers_modules"), verdict["module"]
    assert verdict["class"] == type(saved.model).__name__
    assert verdict["dtype"] == "torch.float32"
    assert verdict["params"] == n_params(saved.model) == saved.dense_params - saved.removed
    assert verdict["layer_shapes"] == saved.model.config.layer_shapes
    assert verdict["output_equal"], f"{saved.name}: {saved.output} differs after reload in a fresh process"
    if saved.new_tokens:
        assert verdict["generate_equal"], f"{saved.name}: greedy tokens differ after reload in a fresh process"


# ---- (a) and (b): tiny random models ------------------------------------------------------------
VOCAB = 60


def _ids(seed: int, batch: int, seq: int, left_pad: bool):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1, :3], mask[1, :3] = 0, 0
    else:
        mask[1, -3:] = 0
    return ids, mask


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=5,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    plan = PruningPlan(heads={0: [1, 4], 3: [0, 1, 2, 5]}, kv_groups={1: [0]}, neurons={0: list(range(0, 40, 3)),
                       1: [7], 3: list(range(30))}, layers=[2])
    return LlamaForCausalLM(config), plan


def _tiny_qwen2():
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=36, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=12, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=False)
    plan = PruningPlan(heads={2: [1, 3, 5]}, kv_groups={0: [2]}, neurons={2: [0, 23]}, layers=[1])
    return Qwen2ForCausalLM(config), plan


def _tiny_qwen3():
    torch.manual_seed(5)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_bias=True)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_norm", "k_norm")):
                module.weight.uniform_(0.5, 1.5)
    plan = PruningPlan(heads={0: [1, 2]}, kv_groups={2: [1]}, neurons={2: list(range(10))}, layers=[1])
    return model, plan


def _tiny_bert(cls):
    torch.manual_seed(2)
    config = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    plan = PruningPlan(heads={0: [1], 2: [0, 2, 3]}, neurons={0: list(range(20)), 3: [5]}, layers=[1])
    return cls(config), plan


def _tiny_roberta():
    torch.manual_seed(3)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=24, max_position_embeddings=40, initializer_range=0.2, pad_token_id=1)
    plan = PruningPlan(heads={2: [3]}, kv_groups={0: [0, 1]}, neurons={0: [1, 2], 2: list(range(12))}, layers=[1])
    return RobertaModel(config), plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Saved]:
    root = tmp_path_factory.mktemp("tiny_pruned")
    saved = {}
    model, plan = _tiny_llama()
    saved["llama"] = prune_and_save("llama", model, plan, "AutoModelForCausalLM", "logits",
                                    *_ids(0, 2, 9, left_pad=True), root, new_tokens=5, pad_token_id=0)
    model, plan = _tiny_llama()  # the same plan with reconstruction: refitted weights and new biases
    saved["llama_reconstructed"] = reconstruct_and_save("llama_reconstructed", model, plan, 0, root)
    model, plan = _tiny_qwen2()
    saved["qwen2"] = prune_and_save("qwen2", model, plan, "AutoModelForCausalLM", "logits",
                                    *_ids(1, 2, 9, left_pad=True), root, new_tokens=5, pad_token_id=0)
    model, plan = _tiny_qwen3()  # reconstructed: its o_proj already has a bias (attention_bias=True)
    saved["qwen3_reconstructed"] = reconstruct_and_save("qwen3_reconstructed", model, plan, 5, root)
    model, plan = _tiny_bert(BertModel)
    saved["bert"] = prune_and_save("bert", model, plan, "AutoModel", "last_hidden_state",
                                   *_ids(2, 2, 10, left_pad=False), root)
    model, plan = _tiny_bert(BertForSequenceClassification)
    saved["bert_classifier"] = prune_and_save("bert_classifier", model, plan, "AutoModelForSequenceClassification",
                                              "logits", *_ids(3, 2, 10, left_pad=False), root)
    model, plan = _tiny_roberta()
    saved["roberta"] = prune_and_save("roberta", model, plan, "AutoModel", "last_hidden_state",
                                      *_ids(4, 2, 10, left_pad=False), root)
    return saved


@pytest.fixture(scope="module")
def tiny_fresh(tiny, tmp_path_factory) -> dict[str, dict]:
    """All tiny checkpoints checked in one fresh process (an interpreter start costs seconds)."""
    return run_fresh([s.job() for s in tiny.values()], tmp_path_factory.mktemp("fresh_tiny"))


TINY = ["llama", "llama_reconstructed", "qwen2", "qwen3_reconstructed", "bert", "bert_classifier", "roberta"]


def test_reconstructed_checkpoint_has_the_new_biases(tiny):
    saved = tiny["llama_reconstructed"]
    plain = tiny["llama"]
    shapes = saved.model.config.layer_shapes
    assert any(s["o_bias"] for s in shapes) and any(s["mlp_out_bias"] for s in shapes)
    assert not any(s["o_bias"] or s["mlp_out_bias"] for s in plain.model.config.layer_shapes)
    hidden = saved.model.config.hidden_size
    n_bias = sum(s["o_bias"] + s["mlp_out_bias"] for s in shapes)
    assert n_params(saved.model) == n_params(plain.model) + n_bias * hidden


@pytest.mark.parametrize("name", TINY)
def test_saved_directory_is_safetensors_config_and_code(tiny, name):
    config = check_directory(tiny[name])
    shapes = config["layer_shapes"]
    assert len({json.dumps(s, sort_keys=True) for s in shapes}) > 1, "the test plan should be non-uniform"


@pytest.mark.parametrize("name", TINY)
def test_reload_in_process_is_bit_identical(tiny, name):
    saved = tiny[name]
    reloaded = AUTO[saved.auto].from_pretrained(saved.dir).eval()
    assert type(reloaded) is type(saved.model)
    assert reloaded.config.layer_shapes == saved.model.config.layer_shapes
    assert n_params(reloaded) == n_params(saved.model)
    state, expected_state = reloaded.state_dict(), saved.model.state_dict()
    assert list(state) == list(expected_state)
    assert all(torch.equal(state[k], expected_state[k]) for k in state)
    t = saved.expected
    with torch.no_grad():
        got = getattr(reloaded(input_ids=t["input_ids"], attention_mask=t["attention_mask"]), saved.output)
    assert torch.equal(got, t["expected"])
    if saved.new_tokens:
        tokens = reloaded.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], do_sample=False,
                                   max_new_tokens=saved.new_tokens, pad_token_id=saved.pad_token_id)
        assert torch.equal(tokens, t["generated"])


@pytest.mark.parametrize("name", TINY)
def test_fresh_process_without_course_lib_is_bit_identical(tiny, tiny_fresh, name):
    check_fresh_verdict(tiny[name], tiny_fresh[name])


def test_import_course_lib_alone_registers_the_pruned_types(tiny, tmp_path):
    """A fresh process: ``import course_lib`` (which loads neither torch nor transformers), then
    ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification.from_pretrained(dir)``."""
    names = ["llama", "bert_classifier"]
    verdicts = run_fresh([tiny[n].job() for n in names], tmp_path, script=REGISTERED_CHECK)
    for name in names:
        verdict = verdicts[name]
        assert verdict["heavy_after_import"] == [], "import course_lib loaded torch or transformers"
        assert verdict["module"] == "course_lib.pruned_modeling", verdict["module"]  # registered, not remote code
        assert verdict["class"] == type(tiny[name].model).__name__
        assert verdict["output_equal"], f"{name}: logits differ after reload in a fresh process"


@pytest.mark.parametrize("name", TINY)
def test_fresh_process_without_trust_remote_code_says_so(tiny_fresh, name):
    message = tiny_fresh[name]["without_trust"]
    assert message != "loaded"
    assert "trust_remote_code" in message, message


def test_reloaded_pruned_model_can_be_pruned_again_and_saved(tiny, tmp_path):
    saved = tiny["llama"]
    model = AutoModelForCausalLM.from_pretrained(saved.dir).eval()
    before = n_params(model)
    plan = PruningPlan(heads={0: [0, 2]}, neurons={1: [0, 1]}, layers=[3])  # in the pruned numbering
    removed = parameters_removed(model, plan)
    apply_plan(model, plan)
    assert before - n_params(model) == removed
    model.save_pretrained(tmp_path / "twice")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "twice").eval()
    ids, mask = saved.expected["input_ids"], saved.expected["attention_mask"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    assert again.config.layer_shapes == model.config.layer_shapes and len(again.config.layer_shapes) == 3


# ---- (c) the embedded models ----------------------------------------------------------------------
def smollm2_plan() -> PruningPlan:
    """Non-uniform: whole KV groups here, query heads within groups there, various neuron counts.

    SmolLM2-135M: 30 layers, 9 query heads in 3 KV groups of 3, 1536 neurons per layer.
    """
    gen = torch.Generator().manual_seed(0)
    layers = [11, 23]
    neurons = {}
    for layer in range(30):
        if layer not in layers and layer % 3 != 2:
            count = 64 * (1 + (layer * 7) % 12)  # 64 .. 768, different from layer to layer
            neurons[layer] = torch.randperm(1536, generator=gen)[:count].tolist()
    return PruningPlan(
        kv_groups={2: [1], 7: [0, 2], 15: [2], 28: [0]},
        heads={4: [0, 3, 6], 9: [1, 2, 4, 5, 7, 8], 15: [0, 3], 20: [2, 5, 8], 25: [0, 1, 2], 28: [3, 8]},
        neurons=neurons,
        layers=layers,
    )


def minilm_plan() -> PruningPlan:
    """MiniLM-L6: 6 layers, 12 heads (one KV head each), 1536 neurons per layer."""
    gen = torch.Generator().manual_seed(1)
    return PruningPlan(
        heads={0: [0, 5, 11], 1: list(range(0, 12, 2)), 3: [7], 5: list(range(10))},
        neurons={0: torch.randperm(1536, generator=gen)[:500].tolist(),
                 2: torch.randperm(1536, generator=gen)[:1000].tolist(),
                 5: torch.randperm(1536, generator=gen)[:100].tolist()},
        layers=[4],
    )


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, Saved]:
    """SmolLM2 and MiniLM, loaded once, pruned, saved; the dense models are not kept."""
    from course_lib import zoo

    root = tmp_path_factory.mktemp("embedded_pruned")
    saved = {}
    decoder, tokenizer = zoo.load_decoder("smollm2-135m")
    batch = tokenizer(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt",
                      padding=True, padding_side="left")
    saved["smollm2"] = prune_and_save("smollm2", decoder, smollm2_plan(), "AutoModelForCausalLM", "logits",
                                      batch["input_ids"], batch["attention_mask"], root, new_tokens=10,
                                      pad_token_id=tokenizer.pad_token_id)
    encoder, tokenizer = zoo.load_encoder("minilm-l6")
    batch = tokenizer(["A man is playing a guitar.", "The stock market fell sharply today after the report."],
                      return_tensors="pt", padding=True)
    saved["minilm"] = prune_and_save("minilm", encoder, minilm_plan(), "AutoModel", "last_hidden_state",
                                     batch["input_ids"], batch["attention_mask"], root)
    return saved


@pytest.fixture(scope="module")
def embedded_fresh(embedded, tmp_path_factory) -> dict[str, dict]:
    return run_fresh([s.job() for s in embedded.values()], tmp_path_factory.mktemp("fresh_embedded"))


@pytest.mark.slow
def test_smollm2_pruned_non_uniformly(embedded):
    saved = embedded["smollm2"]
    shapes = saved.model.config.layer_shapes
    assert len(shapes) == 28
    assert len({s["num_attention_heads"] for s in shapes}) >= 4  # 9, 6, 3 and more
    assert {s["num_key_value_heads"] for s in shapes} == {1, 2, 3}
    assert len({s["intermediate_size"] for s in shapes}) >= 8
    assert saved.dense_params - n_params(saved.model) == saved.removed > 0
    check_directory(saved)
    # greedy generation of the pruned model produces tokens (and they are what a reload must match)
    assert saved.expected["generated"].shape == (2, saved.expected["input_ids"].shape[1] + 10)


@pytest.mark.slow
def test_smollm2_fresh_reload_is_bit_identical(embedded, embedded_fresh):
    check_fresh_verdict(embedded["smollm2"], embedded_fresh["smollm2"])
    assert "trust_remote_code" in embedded_fresh["smollm2"]["without_trust"]


@pytest.mark.slow
def test_minilm_pruned_and_fresh_reload_is_bit_identical(embedded, embedded_fresh):
    saved = embedded["minilm"]
    shapes = saved.model.config.layer_shapes
    assert [s["num_attention_heads"] for s in shapes] == [9, 6, 12, 11, 2]
    assert [s["intermediate_size"] for s in shapes] == [1036, 1536, 536, 1536, 1436]
    assert saved.dense_params - n_params(saved.model) == saved.removed > 0
    check_directory(saved)
    check_fresh_verdict(saved, embedded_fresh["minilm"])
    assert "trust_remote_code" in embedded_fresh["minilm"]["without_trust"]
