"""The CLI's bad input: one line on stderr naming the flag, exit code 2, before any work.

Each case runs ``course_lib.__main__.main`` in this process with every expensive step replaced by
a function that fails the test if called: loading weights (the zoo's loaders, the sentiment
baseline, the GGUF conversion), scoring (importance, the planner's sensitivities) and surgery.
So an error that reaches stderr was raised by the checks against the model's config alone, and
the report folder was never created. Tiny models are saved to local directories (``--model
DIR``); the embedded models' configs are read without their weights.
"""

from __future__ import annotations

import pytest
from transformers import GPT2Config

from course_lib import budget, importance, pipeline, sentiment, zoo
from course_lib.__main__ import main

from tiny import tiny_bert, tiny_llama

EXPENSIVE = [(zoo, "load_decoder"), (zoo, "load_encoder"), (zoo, "load_encoder_classifier"), (zoo, "prepare_decoder"),
             (sentiment, "load_baseline"), (importance, "block_influence"), (importance, "head_scores"),
             (importance, "neuron_scores"), (budget, "sensitivity"), (pipeline, "plan_for_budget"),
             (pipeline, "prune_and_reconstruct")]


@pytest.fixture
def no_work(monkeypatch):
    """Every expensive step fails the test if reached; returns the list of those that were."""
    reached = []
    for module, name in EXPENSIVE:
        def refuse(*args, _name=f"{module.__name__}.{name}", **kwargs):
            reached.append(_name)
            raise AssertionError(f"{_name} called before the settings were checked")
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return reached


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """tiny_llama saved: 3 layers, 4 query heads in 2 KV groups of head_dim 8, FFN 24, 64 positions."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(directory)
    return directory


# Timing within the tiny models' positions, and a format their widths (32, 24) allow; a later flag wins.
SHORT = ["--latency-seq", "16", "--decode-tokens", "4", "--quantize", "bf16"]


def run_cli(args: list[str], out, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test wrote before (save_pretrained's progress bar)
    code = main(["run", "--out", str(out), *args])
    return code, capsys.readouterr().err


def check_refused(args, out, capsys, reached, *expected) -> str:
    code, err = run_cli(args, out, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    for text in expected:
        assert text in err, err
    assert not reached, reached
    assert not out.exists()  # nothing written either
    return err


TINY_CASES = {
    "layers above the model": (["--layers", "5"], "--layers:", "out of range [0, 2]"),
    "layers above the unprotected": (["--layers", "2"], "--layers:", "only 1 are unprotected",
                                     "--protect-first=1, --protect-last=1"),
    "protections cover the model": (["--protect-first", "2", "--protect-last", "1", "--neuron-fraction", "0.1"],
                                    "--protect-first=2 + --protect-last=1 = 3", "at most 2"),
    "kv groups beyond GQA's reach": (["--head-fraction", "0.9", "--granularity", "kv_group", "--multiple", "1",
                                      "--quantize"], "--head-fraction=0.9:", "5 KV groups requested but at most 1"),
    "query heads beyond the protections": (["--head-fraction", "0.9", "--multiple", "1", "--quantize"],
                                           "--head-fraction=0.9:", "10 query heads requested but at most 3"),
    "alignment wider than the MLP": (["--neuron-fraction", "0.5", "--multiple", "64", "--quantize"],
                                     "--neuron-fraction=0.5:", "at most 0 can be removed", "--multiple=64"),
    "heads after every unprotected layer is gone": (["--layers", "1", "--head-fraction", "0.25", "--multiple", "1",
                                                     "--quantize"], "--head-fraction=0.25:"),
    "group size dividing no width": (["--quantize", "rtn", "--group-size", "48"], "--quantize=('rtn',):",
                                     "--group-size=48 does not divide the input width 32"),
    "widths AWQ's search cannot take": (["--quantize", "awq", "--group-size", "8"], "--quantize=('awq',):",
                                        "the output width 32 of model.layers.0.self_attn.q_proj is not a multiple of 64"),
    "widths the int8 kernel cannot read": (["--quantize", "int8"], "--quantize=('int8',):",
                                           "the input width 24 of model.layers.0.mlp.down_proj is not a multiple of 16"),
    "prompt longer than the positions": (["--latency-seq", "64"], "--latency-seq:",
                                         "--latency-seq=64 + --decode-tokens=4 = 68 tokens", "64 positions"),
    "budget beyond the protections": (["--param-fraction", "0.9", "--multiple", "1", "--quantize"],
                                      "--param-fraction=0.9:", "the constraints allow at most"),
    # rounds 1 and 2 remove a layer each; round 3 finds one layer left, which must stay
    "the last of three rounds": (["--layers", "3", "--steps", "3", "--protect-first", "0", "--protect-last", "0"],
                                 "--layers:", "count=1 is out of range [0, 0]"),
}


@pytest.mark.parametrize("case", TINY_CASES)
def test_bad_settings_on_a_local_model_stop_before_any_work(case, llama_dir, tmp_path, capsys, no_work):
    args, *expected = TINY_CASES[case]
    check_refused(["--model", str(llama_dir), *SHORT, *args], tmp_path / "out", capsys, no_work, *expected)


def test_the_same_settings_within_the_model_pass_the_checks(llama_dir, tmp_path, capsys, no_work):
    """The counterpart: a feasible request gets past every check and stops at the first load."""
    with pytest.raises(AssertionError, match="zoo.load_decoder called"):
        run_cli(["--model", str(llama_dir), *SHORT, "--layers", "1", "--head-fraction", "0.25", "--multiple", "1",
                 "--protect-first", "0"], tmp_path / "out", capsys)
    assert no_work == ["course_lib.zoo.load_decoder"]


def test_a_missing_local_directory_says_so(tmp_path, capsys, no_work):
    check_refused(["--model", str(tmp_path / "nowhere")], tmp_path / "out", capsys, no_work,
                  f"error: --model: no such directory: {tmp_path / 'nowhere'}")


def test_a_directory_without_a_model_says_what_is_available(tmp_path, capsys, no_work):
    (tmp_path / "empty").mkdir()
    check_refused(["--model", str(tmp_path / "empty")], tmp_path / "out", capsys, no_work,
                  "--model: cannot load the directory", "config.json", "'smollm2-135m' (decoder)")


@pytest.mark.parametrize("name,expected", [
    ("nosuchmodel", "'nosuchmodel' is neither a local directory, an embedded model nor a hub id"),
    ("nosuch-org/nosuch-model", "cannot load hub model 'nosuch-org/nosuch-model'"),
])
def test_an_unknown_name_lists_what_is_available(name, expected, tmp_path, capsys, no_work):
    err = check_refused(["--model", name], tmp_path / "out", capsys, no_work, "error: --model: ", expected)
    assert "'minilm-l6' (encoder)" in err and "'smollm2-135m' (decoder)" in err and "cached hub model" in err


def test_an_unsupported_family_is_named(tmp_path, capsys, no_work):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    check_refused(["--model", str(tmp_path / "gpt2")], tmp_path / "out", capsys, no_work,
                  "--model: model_type='gpt2' is not supported", "'llama'")


def test_awq_on_an_encoder_directory_is_refused(tmp_path, capsys, no_work):
    """A local directory is taken for a causal LM; its family still decides what AWQ can do."""
    tiny_bert().save_pretrained(tmp_path / "bert")
    check_refused(["--model", str(tmp_path / "bert"), *SHORT, "--quantize", "awq"], tmp_path / "out", capsys, no_work,
                  "--quantize=('awq',): ['awq'] need AWQ's search", "not the bert family")


# ---- the embedded models: their configs are read, their weights are not --------------------------------------
EMBEDDED_CASES = {
    "smollm2: 40 of 30 layers": (["--model", "smollm2-135m", "--layers", "40"], "--layers:",
                                 "out of range [0, 29] (at least one of 30 layers stays)"),
    "smollm2: 89 KV groups": (["--model", "smollm2-135m", "--head-fraction", "0.99", "--granularity", "kv_group"],
                              "--head-fraction=0.99:", "89 KV groups requested but at most 56"),
    "smollm2: a group size the int4 kernel lacks": (["--model", "smollm2-135m", "--group-size", "48"],
                                                    "--quantize=('int4', 'awq', 'int8', 'bf16', 'rtn'):",
                                                    "--group-size=48 is not one the CPU int4 kernel implements",
                                                    "allowed: 32, 64, 128, 256"),
    "minilm: AWQ on an encoder": (["--model", "minilm-l6", "--quantize", "awq"], "--quantize=('awq',):",
                                  "not the bert family"),
    "minilm: 6 of 6 layers": (["--model", "minilm-l6", "--layers", "6", "--quantize", "int8"], "--layers:",
                              "out of range [0, 5]"),
}


@pytest.mark.parametrize("case", EMBEDDED_CASES)
def test_bad_settings_on_an_embedded_model_stop_before_loading_it(case, tmp_path, capsys, no_work):
    args, *expected = EMBEDDED_CASES[case]
    check_refused(args, tmp_path / "out", capsys, no_work, *expected)


# ---- the user's data: files, columns and labels are read and checked before any model loads ---------------
def _data_cases(tmp):
    (tmp / "reviews.csv").write_text("review,stars\n" + "good,1\nbad,0\n" * 10)
    (tmp / "odd.csv").write_text("review,stars\nmeh,7\n")
    (tmp / "short.txt").write_text("one document\n\nand another\n")
    return {
        "no such train file": (["--model", "minilm-l6", "--train-file", str(tmp / "nope.csv")],
                               f"error: --train-file='{tmp / 'nope.csv'}': no such file"),
        "no such column": (["--model", "minilm-l6", "--train-file", str(tmp / "reviews.csv")],
                           "--train-file=", "has no column 'text', 'label'; its columns: review, stars",
                           "name yours with --text-column= and --label-column="),
        "a test label the train file lacks": (["--model", "minilm-l6", "--train-file", str(tmp / "reviews.csv"),
                                               "--test-file", str(tmp / "odd.csv"), "--text-column", "review",
                                               "--label-column", "stars"],
                                              "error: --test-file: labels ['7'] are not among the train file's labels (0, 1)"),
        "a classifier's file for a causal LM": (["--model", "smollm2-135m", "--train-file", str(tmp / "reviews.csv")],
                                                "--train-file=", "is a classifier's data; a causal LM reads --text-file="),
        "too few documents": (["--model", "smollm2-135m", "--text-file", str(tmp / "short.txt")],
                              "--text-file=", "holds 2 document(s); at least 3"),
        "both kinds of data": (["--text-file", "a.txt", "--train-file", "b.csv"], "error: --text-file='a.txt' and --train-file='b.csv': give one, not both"),
        "a test file without a train file": (["--model", "minilm-l6", "--test-file", str(tmp / "odd.csv")],
                                             "error: --test-file=", "needs --train-file= as well"),
    }


@pytest.mark.parametrize("case", ["no such train file", "no such column", "a test label the train file lacks",
                                  "a classifier's file for a causal LM", "too few documents", "both kinds of data",
                                  "a test file without a train file"])
def test_bad_data_files_stop_before_any_model_loads(case, tmp_path, capsys, no_work):
    args, *expected = _data_cases(tmp_path)[case]
    check_refused(args, tmp_path / "out", capsys, no_work, *expected)
