"""The course_lib code paths on a CUDA GPU: scoring, selection, surgery, save/reload, speed, recovery.

    python benchmarks/gpu_check.py --out gpu_check.json        # on a machine with a GPU
    python benchmarks/gpu_check.py --small --device cpu        # a quick dry run anywhere

The model has SmolLM2-135M's shapes (30 layers, 9 query / 3 KV heads, FFN 1536) with random
weights: latency does not depend on the values, and the embedded weights are not carried to the
GPU machine. Exactness is checked in fp32. Speed, pruned against dense in bf16, timed side by side
taking turns (``course_lib.timing.compare``): prefill and decode in eager mode; decode
again through ``generate`` with a static KV cache, which transformers compiles (CUDA graphs); and
autoawq's INT4 GEMM layers against bf16 (their CUDA kernels need autoawq's ``awq_ext``; without it
the layers dequantise in plain torch, and the output says which ran). A step that fails on the
machine records its error instead of stopping the script. About 5 minutes on an H200.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from course_lib import importance, quantize, selection, timing
from course_lib.evaluate import count_parameters, forward_flops, storage_bytes
from course_lib.plan import PruningPlan
from course_lib.pruned_modeling import adapter_for
from course_lib.recovery import RecoveryConfig, fine_tune
from course_lib.surgery import apply_plan

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=2048, rope_theta=100000.0)
SMALL = dict(SMOLLM2, vocab_size=512, num_hidden_layers=6)


def zeroed_reference(model, plan: PruningPlan):
    """The dense model with the plan's structures contributing nothing (Llama blocks: no o/down bias)."""
    reference = copy.deepcopy(model)
    adapter = adapter_for(reference)
    blocks, head_dim = adapter.blocks(reference), adapter.head_dim(reference)
    with torch.no_grad():
        for layer in plan.layers:
            adapter.o_proj(blocks[layer]).weight.zero_()
            adapter.mlp_out(blocks[layer]).weight.zero_()
        for layer in set(plan.heads) | set(plan.kv_groups):
            kept, _ = plan.kept_heads(reference, layer)
            for head in set(range(adapter.num_heads(blocks[layer]))) - set(kept):
                adapter.o_proj(blocks[layer]).weight[:, head * head_dim:(head + 1) * head_dim] = 0
        for layer, neurons in plan.neurons.items():
            adapter.mlp_out(blocks[layer]).weight[:, neurons] = 0
    return reference


def stopwatch(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, round(time.perf_counter() - start, 3)


def attempt(step):
    """``step()``'s result, or its error: an untested path on a lent machine must not end the run."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001 (reported in the output)
        return {"error": f"{type(error).__name__}: {error}"}


def generate_steps(model, ids, new_tokens: int):
    """``timing.compare``'s decode timer for ``generate`` with a static KV cache (compiled by
    transformers): the whole generation is timed at once, prefill included, and each of its
    ``new_tokens`` steps is reported as the mean step, so these models take turns generation by
    generation, not token by token."""
    model.generation_config.cache_implementation = "static"
    timing.synchronize(ids.device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    timing.synchronize(ids.device)
    step = (time.perf_counter() - start) / new_tokens
    yield from [step] * new_tokens


def awq_against_bf16(pruned, bf16_model, calib, seq: int, new_tokens: int, rounds: int) -> dict:
    awq = quantize.awq_int4(copy.deepcopy(pruned), calib[:8], group_size=64)
    try:
        import awq_ext  # noqa: F401
        kernels = "awq_ext (CUDA)"
    except ImportError:
        kernels = "none: dequantise in torch"
    speed = timing.compare({"bf16": bf16_model, "awq int4": awq.to(calib.device)}, seq=seq, new_tokens=new_tokens,
                           rounds=rounds)
    return {"kernels": kernels, "timing": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="6 layers, small vocabulary: a dry run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    config = LlamaConfig(**(SMALL if args.small else SMOLLM2))
    model = LlamaForCausalLM(config).to(device).eval()
    n_layers = config.num_hidden_layers
    calib = torch.randint(0, config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(1)).to(device)

    # 1. Scores and selection on the GPU (fp32), timed.
    layer_scores, results["block_influence_s"] = stopwatch(lambda: importance.block_influence(model, calib, progress=False))
    head_scores, results["head_taylor_s"] = stopwatch(lambda: importance.head_scores(model, calib, "taylor", progress=False))
    neuron_scores, results["neuron_wanda_s"] = stopwatch(lambda: importance.neuron_scores(model, calib, "wanda", progress=False))
    plan = selection.merge_plans(
        selection.select_layers(model, layer_scores, count=max(1, n_layers // 5), protect_first=1, protect_last=1),
        selection.select_heads(model, head_scores, fraction=0.25, granularity="kv_group", protect_first=1, protect_last=1),
        selection.select_neurons(model, neuron_scores, fraction=0.3, protect_first=1, protect_last=1),
        model=model)
    results["plan"] = plan.to_dict()

    # 2. Exactness of surgery on the GPU against the zeroed dense model.
    reference = zeroed_reference(model, plan)
    dense = copy.deepcopy(model)
    _, results["surgery_s"] = stopwatch(lambda: apply_plan(model, plan))
    ids = calib[:2, :32]
    with torch.no_grad():
        results["max_abs_logit_diff_vs_zeroed_dense"] = (model(ids).logits - reference(ids).logits).abs().max().item()
        same_tokens = torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                                  reference.generate(ids, max_new_tokens=8, do_sample=False))
    results["generate_same_tokens_as_zeroed_dense"] = same_tokens
    results["params_dense"], results["params_pruned"] = count_parameters(dense), count_parameters(model)

    # 3. Save and reload onto the GPU.
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
        with torch.no_grad():
            results["reload_bit_identical"] = torch.equal(reloaded(ids).logits, model(ids).logits)
    del reference, reloaded

    # 4. Speed in bf16, pruned against dense, timed side by side.
    seq, new_tokens, rounds = (64, 8, 2) if args.small else (512, 64, 7)
    m16 = {name: copy.deepcopy(m).to(torch.bfloat16) for name, m in (("dense", dense), ("pruned", model))}
    results["speed_bf16_eager"] = timing.compare(m16, seq=seq, new_tokens=new_tokens, rounds=rounds)
    results["ideal_prefill_speedup_from_flops"] = forward_flops(m16["dense"], 1, seq) / forward_flops(m16["pruned"], 1, seq)
    results["ideal_decode_speedup_from_bytes"] = storage_bytes(m16["dense"]) / storage_bytes(m16["pruned"])
    eager = results["speed_bf16_eager"]
    results["speedup_eager"] = {mode: timing.paired_speedup(eager["dense"][key], eager["pruned"][key])
                                for mode, key in (("prefill", "prefill_samples_ms"), ("decode", "decode_step_ms"))}
    results["speed_bf16_static_cache_compiled"] = attempt(lambda: timing.compare(
        m16, seq=seq, new_tokens=new_tokens, rounds=rounds, warmup=2,
        timers=(timing.prefill_seconds, generate_steps)))
    results["awq_against_bf16"] = attempt(lambda: awq_against_bf16(model, m16["pruned"], calib, seq, new_tokens,
                                                                    rounds))

    # 5. Recovery with the HF Trainer on the GPU (a few steps on a learnable pattern).
    starts = torch.randint(0, config.vocab_size, (48, 1), generator=torch.Generator().manual_seed(2))
    seqs = ((starts + torch.arange(64)) % config.vocab_size).tolist()
    data = Dataset.from_dict({"input_ids": seqs, "labels": seqs})
    result, results["recovery_s"] = stopwatch(lambda: fine_tune(
        model, data.select(range(40)), data.select(range(40, 48)),
        RecoveryConfig(epochs=2, learning_rate=1e-3, batch_size=8, patience=2), progress=False))
    losses = [h["eval_loss"] for h in result["log_history"] if "eval_loss" in h]
    results["recovery_eval_losses"] = losses
    results["recovery_on"] = str(next(model.parameters()).device)

    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
