"""The pipeline end to end on tiny random models of both families, and the CLI's bad input."""

import json
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from course_lib.__main__ import main
from course_lib.evaluate import accuracy, perplexity
from course_lib.pipeline import PruningConfig, run
from course_lib.plan import PruningPlan
from course_lib import lowbit
from course_lib.quantize import load_awq
from course_lib.surgery import apply_plan

# Every model here is tiny: one intra-op thread loses nothing, and spares the 10x stall of two
# OpenMP threads on 2 cores shared with another process (a 2.7 s test measured 46 s that way).
pytestmark = pytest.mark.usefixtures("one_thread")


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


class TinyDecoderTask:
    """A random 4-layer Llama (GQA) judged by perplexity on a counting pattern it can learn."""

    quality_name, auto_class = "perplexity", "AutoModelForCausalLM"
    data_collator = None
    tokenizer = _NoTokenizer()

    def model_config(self):
        return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           architectures=["LlamaForCausalLM"])

    def load(self):
        torch.manual_seed(0)
        return LlamaForCausalLM(self.model_config()).eval()

    def _ids(self, n, seed):
        starts = torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(seed))
        return (starts + torch.arange(32)) % 64

    def calibration(self, seed=0):
        return self._ids(8, seed)

    def planning_calibration(self, seed=0):
        return self._ids(16, seed + 5)

    def quality(self, model):
        return perplexity(model, self._ids(4, 99).reshape(-1), context=32)

    recovery_batch, recovery_tokens, recovery_learning_rate = 8, 1024, 3e-3

    def recovery_data(self, seed=0):
        as_ds = lambda ids: Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})  # noqa: E731
        return as_ds(self._ids(32, seed + 1)), as_ds(self._ids(8, seed + 2))


class TinyEncoderTask:
    """A random 3-layer BERT classifier judged by accuracy on 'is the first token even'."""

    quality_name, auto_class = "accuracy", "AutoModelForSequenceClassification"
    data_collator = None
    tokenizer = _NoTokenizer()

    def model_config(self):
        return BertConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, architectures=["BertForSequenceClassification"])

    def load(self):
        torch.manual_seed(0)
        return BertForSequenceClassification(self.model_config()).eval()

    def _data(self, n, seed):
        ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))
        return ids, (ids[:, 0] % 2 == 0).long()

    def calibration(self, seed=0, n=16):
        ids, labels = self._data(n, seed)
        return [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8]),
                 "labels": labels[i:i + 8]} for i in range(0, n, 8)]

    def planning_calibration(self, seed=0):
        return self.calibration(seed + 5, n=32)

    def quality(self, model):
        ids, labels = self._data(64, 99)
        with torch.no_grad():
            return accuracy(model(input_ids=ids).logits.argmax(-1), labels)

    recovery_batch, recovery_tokens, recovery_learning_rate = 8, 768, 1e-3

    def recovery_data(self, seed=0):
        def as_ds(n, s):
            ids, labels = self._data(n, s)
            return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
        return as_ds(64, seed + 1), as_ds(16, seed + 2)


@pytest.mark.parametrize("steps", [1, 2])
def test_decoder_pipeline_end_to_end(tmp_path, steps):
    config = PruningConfig(model="tiny", layers=1, head_fraction=0.25, neuron_fraction=0.25, multiple=1,
                           protect_first=0, protect_last=1, steps=steps, recovery_tokens=2048, learning_rate=3e-3,
                           quantize=("int8", "bf16"), latency_seq=16, decode_tokens=4, timing_rounds=2,
                           prefill_passes=2)
    history = run(config, tmp_path, progress=False, task=TinyDecoderTask())
    names = [s.stage for s in history]
    expected = ["dense"] + [f"{kind}{f' {i}/{steps}' if steps > 1 else ''}" for i in range(1, steps + 1)
                            for kind in ("pruned", "recovered")] + ["int8 weight-only", "bf16"]
    assert names == expected
    dense, pruned, recovered = history[0], history[-4], history[-3]
    assert pruned.params < dense.params and pruned.flops < dense.flops
    assert recovered.quality < pruned.quality  # recovery lowers perplexity
    plans = json.loads((tmp_path / "plan.json").read_text())
    assert len(plans) == steps
    applied = [PruningPlan.from_dict(a["plan"]) for p in plans for a in p["applied"]]
    assert sum(len(p.layers) for p in applied) == 1
    for name in ("report.md", "history.json", "stages.png", "model/model.safetensors", "model/config.json",
                 "int8/model.safetensors", "bf16/config.json"):
        assert (tmp_path / name).exists(), name
    # every stage timed at the end, side by side: prefill and decode
    saved = json.loads((tmp_path / "history.json").read_text())
    for stage in saved["history"]:
        assert stage["prefill_ms"] > 0 and stage["decode_tokens_per_s"] > 0, stage["stage"]
        assert len(stage["prefill_samples_ms"]) == 2 * 2 and len(stage["decode_step_ms"]) == 2 * 4  # rounds x passes
        assert {"quality", "params", "weight_bytes", "flops"} <= set(stage)
    assert [row["stage"] for row in saved["speed"]] == names
    int8, bf16 = history[-2:]
    assert int8.weight_bytes < bf16.weight_bytes < recovered.weight_bytes
    assert abs(int8.quality - recovered.quality) < 0.05 * recovered.quality
    report = (tmp_path / "report.md").read_text()
    header = ("| stage | params | weights MB | prefill ms (IQR) | prefill speedup | decode tok/s (IQR) | decode speedup "
              "| perplexity |")
    assert header in report
    assert report.count("\n| ") == len(history) + 1 + 1 + steps  # the stages, then one recovery row per round
    rounds = [s.extra["recovery"] for s in history if "recovery" in s.extra]
    # matched compute: iterative rounds share the one budget (2048 tokens = 8 steps of 8 x 32 tokens)
    assert [r["tokens"] for r in rounds] == [2048 // steps] * steps
    assert all(r["best_eval_loss"] <= r["initial_eval_loss"] for r in rounds)
    assert "recovery.png" in report and (tmp_path / "recovery.png").exists()


@pytest.mark.parametrize("reconstruct", [True, False])
def test_budget_pipeline_removes_the_share_of_block_parameters(tmp_path, reconstruct):
    config = PruningConfig(model="tiny", param_fraction=0.3, multiple=16, protect_first=0, protect_last=1,
                           steps=2, recovery_tokens=0, quantize=(), latency_seq=16, reconstruct=reconstruct)
    task = TinyDecoderTask()
    dense = task.load()
    history = run(config, tmp_path, progress=False, task=task)
    assert [s.stage for s in history] == ["dense", "pruned 1/2", "pruned 2/2"]
    plans = json.loads((tmp_path / "plan.json").read_text())
    assert [a["kind"] for p in plans for a in p["applied"]] == ["budget", "budget"]
    assert all(("reconstruction" in a) == reconstruct for p in plans for a in p["applied"])
    summary = (tmp_path / "plan.txt").read_text()
    assert summary.count("plan_for_budget: requested") == 2 and "predicted error" in summary
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    blocks = lambda m: sum(p.numel() for b in m.model.layers for p in b.parameters())  # noqa: E731
    biases = sum(b.numel() for layer in saved.model.layers for b in (layer.self_attn.o_proj.bias,
                                                                        layer.mlp.down_proj.bias) if b is not None)
    assert (biases > 0) == reconstruct
    assert blocks(dense) - (blocks(saved) - biases) >= 0.3 * blocks(dense)


class TinyAwqDecoderTask(TinyDecoderTask):
    """The same task on a Llama whose every width is a multiple of 64, as AWQ's packing needs."""

    def model_config(self):
        return LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                           architectures=["LlamaForCausalLM"])


class TinyScaledRopeTask(TinyAwqDecoderTask):
    """The same Llama with a scaled rotary embedding, which onnx_decoder does not write."""

    def model_config(self):
        config = super().model_config()
        config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
        return config


@pytest.mark.slow
def test_decoder_pipeline_quantizes_with_awq_and_rtn(tmp_path):
    config = PruningConfig(model="tiny", neuron_fraction=0.25, protect_first=0, protect_last=0, recovery_tokens=0,
                           quantize=("int4", "awq", "rtn"), latency_seq=16, decode_tokens=4, timing_rounds=2)
    history = run(config, tmp_path, progress=False, task=TinyAwqDecoderTask())
    assert [s.stage for s in history] == ["dense", "pruned", "int4 (CPU kernel, AWQ grid)",
                                          "int4 (onnxruntime, AWQ grid)", "AWQ int4 (autoawq)", "RTN int4 (simulated)"]
    pruned, int4, onnx_int4, awq, rtn = history[1:]
    assert int4.params == awq.params == rtn.params == pruned.params  # packed weights counted as what they stand for
    assert int4.weight_bytes < pruned.weight_bytes and awq.weight_bytes < pruned.weight_bytes == rtn.weight_bytes
    assert abs(awq.quality - pruned.quality) < 0.1 * pruned.quality  # an untrained model: near uniform either way
    assert abs(int4.quality - awq.quality) < 0.02 * awq.quality  # one grid, two kernels
    assert awq.prefill_ms is None and awq.decode_tokens_per_s is None  # no autoawq kernel on a CPU: not timed
    assert int4.prefill_ms > 0 and int4.decode_tokens_per_s > 0
    assert onnx_int4.prefill_ms > 0 and onnx_int4.decode_tokens_per_s > 0  # the int4 checkpoint on onnxruntime
    assert onnx_int4.params == int4.params and abs(onnx_int4.quality - int4.quality) < 0.02 * int4.quality
    loaded = load_awq(tmp_path / "awq")  # the stages were measured on these reloaded checkpoints
    assert TinyAwqDecoderTask().quality(loaded) == awq.quality
    assert TinyAwqDecoderTask().quality(lowbit.load(tmp_path / "int4")) == int4.quality
    report = (tmp_path / "report.md").read_text()
    assert "`course_lib.quantize.load_awq('awq')`" in report and "`course_lib.lowbit.load('int4')`" in report
    assert "| AWQ int4 (autoawq) |" in report and "| not timed |" in report


def test_encoder_pipeline_end_to_end(tmp_path):
    config = PruningConfig(model="tiny", layers=1, head_fraction=0.25, neuron_fraction=0.25, multiple=1,
                           protect_first=0, protect_last=0, recovery_tokens=768, learning_rate=1e-3,
                           quantize=("int8",), latency_seq=12, distill_alpha=0.5, timing_rounds=1)
    history = run(config, tmp_path, progress=False, task=TinyEncoderTask())
    assert [s.stage for s in history] == ["dense", "pruned", "recovered", "int8 weight-only"]
    assert all(0 <= s.quality <= 1 for s in history)
    assert all(s.prefill_ms > 0 and s.decode_tokens_per_s is None for s in history)  # an encoder does not decode
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model_type"] == "pruned_bert" and saved["num_hidden_layers"] == 2


@pytest.mark.slow
def test_int4_that_onnx_runtime_cannot_run_says_why_in_the_report(tmp_path):
    config = PruningConfig(model="tiny", neuron_fraction=0.25, protect_first=0, protect_last=0, recovery_tokens=0,
                           quantize=("int4",), latency_seq=16, decode_tokens=4, timing_rounds=2)
    history = run(config, tmp_path, progress=False, task=TinyScaledRopeTask())
    assert [s.stage for s in history] == ["dense", "pruned", "int4 (CPU kernel, AWQ grid)"]
    report = (tmp_path / "report.md").read_text()
    assert ("- int4 (CPU kernel, AWQ grid): " in report
            and "; not run on ONNX Runtime: onnx_decoder writes the default rotary embedding, not rope_type='linear'"
            in report)


@pytest.mark.parametrize("quantize", [("awq",), ("int8", "int4")])
def test_awq_search_on_an_encoder_is_refused_before_any_work(tmp_path, quantize):
    config = PruningConfig(model="tiny", layers=1, quantize=quantize)
    with pytest.raises(ValueError, match="need AWQ's search, which takes a Llama-family decoder, not the bert family"):
        run(config, tmp_path, progress=False, task=TinyEncoderTask())
    assert not (tmp_path / "model").exists()


def test_pruning_a_quantized_model_is_refused():
    model = TinyDecoderTask().load()
    from course_lib.quantize import int8

    int8(model)
    with pytest.raises(ValueError, match="prune first, then quantize"):
        apply_plan(model, PruningPlan(layers=[0]))


@pytest.mark.parametrize("field,value,message", [
    ("head_fraction", 1.5, r"head_fraction must be in \[0, 1\), got 1.5"),
    ("neuron_method", "random", "neuron_method='random' is unknown; allowed: activation_frequency"),
    ("quantize", ("gptq",), r"quantize=\['gptq'\] is unknown; allowed: int4, awq, int8, bf16, rtn"),
    ("steps", 0, "steps must be >= 1, got 0"),
    ("timing_rounds", 0, "timing_rounds must be >= 1, got 0"),
    ("prefill_passes", 0, "prefill_passes must be >= 1, got 0"),
    ("decode_tokens", 0, "decode_tokens must be >= 1, got 0"),
    ("profile", "huge", "profile='huge' is unknown"),
    ("param_fraction", 1.0, r"param_fraction must be in \[0, 1\), got 1.0"),
    ("recovery_tokens", -1, r"recovery_tokens must be >= 0 \(0 = no recovery\) or None"),
    ("temperature", 0.0, "invalid temperature=0.0"),
    ("learning_rate", -1e-4, "invalid learning_rate=-0.0001"),
    ("learning_rate", 0.0, "invalid learning_rate=0.0"),
    ("hidden_weight", -1.0, "invalid hidden_weight=-1.0"),
    ("lora_rank", -2, "invalid lora_rank=-2"),
])
def test_config_errors_name_the_parameter(field, value, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**{field: value})


def test_budget_and_explicit_amounts_are_exclusive():
    with pytest.raises(ValueError, match="give either param_fraction .* not both"):
        PruningConfig(param_fraction=0.2, neuron_fraction=0.1)


CLI_BAD_ARGUMENTS = [
    (["--neuron-fraction", "1.5"], "--neuron-fraction must be in [0, 1), got 1.5"),
    (["--head-method", "psychic"], "--head-method='psychic' is unknown"),
    (["--param-fraction", "1.2"], "--param-fraction must be in [0, 1), got 1.2"),
    (["--recovery-tokens", "-5"], "--recovery-tokens must be >= 0"),
    (["--temperature", "-1"], "invalid --temperature=-1.0"),
]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m course_lib *argv`` in this process: (exit code, stdout, stderr).

    A subprocess would spend ~6 s of 2 cores importing torch and transformers before it parsed a
    flag; ``main`` returns the exit code the command exits with, and argparse's own exits
    (``--help``) raise ``SystemExit``. test_python_dash_m_course_lib_is_a_command runs the real command.
    """
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,message", CLI_BAD_ARGUMENTS)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    code, _, err = cli(["run", "--out", str(tmp_path), *args], capsys)
    assert code == 2
    assert message in err


def test_cli_help_lists_the_commands(capsys):
    code, out, _ = cli(["--help"], capsys)
    assert code == 0 and "demo" in out and "run" in out


def test_python_dash_m_course_lib_is_a_command(tmp_path):
    """The one subprocess: ``python -m course_lib`` runs ``main`` and exits with the code it returns,
    the refusal on stderr (the first bad argument above)."""
    args, message = CLI_BAD_ARGUMENTS[0]
    result = subprocess.run([sys.executable, "-m", "course_lib", "run", "--out", str(tmp_path), *args],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
