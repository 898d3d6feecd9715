"""Prefill and decode speed of every pruned shape and every low-bit path, side by side, against the ideal.

    .venv/bin/python benchmarks/speed.py                      # both embedded models, 7 rounds
    .venv/bin/python benchmarks/speed.py --models smollm2 --rounds 7 --json speed.json

One run, all variants of one model timed together by ``course_lib.timing.compare`` (taking turns
pass by pass and token by token, median and interquartile range), so a slow moment of the machine
falls on all alike:

* structure (fp32): dense; 20% of the layers dropped; one KV group of three dropped in every
  layer (3 of 9 query heads; for MiniLM 3 of 12 heads); FFN 1536 -> 1152 (aligned to 64) and
  -> 1130 (unaligned); combined (layers, heads and the aligned FFN);
* low-bit, each on the combined model: bf16; weight-only INT8; INT4 on the CPU kernel
  (``course_lib.quantize.int4`` with ``calib=None``, the round-to-nearest grid: speed does not
  depend on the grid); for comparison torchao's own CPU int4 (``PrototypeInt4WeightOnlyConfig``,
  the same aten kernel, on the block linears only: its LM head stays bf16) and torchao's int8
  dynamic-activation path (fp32), which the course used before; the same INT4 model on ONNX
  Runtime (``course_lib.onnx_decoder``: int8 activations times int4 weights in integer
  arithmetic), and the fp32 combined model on ONNX Runtime, which tells how much of that path's
  speed is the runtime and how much the bits.

Structure is what matters for speed, not which units go, so the variants remove fixed indices
(the weights stay the embedded pretrained ones). Prefill: 1 x ``--seq`` tokens, ideal = FLOP
ratio. Decode (SmolLM2 only; MiniLM is an encoder): ``--new-tokens`` greedy tokens with the KV
cache after a ``--seq``-token prompt, ideal = weight-byte ratio. Measured / ideal 1.0 means the
model runs as fast as its arithmetic (prefill) or its bytes (decode) allow.

The kernel figures quoted in ``course_lib/lowbit.py`` (one 1536 x 576 linear, batch 1) come from
``--kernels``, which times the bare aten calls.

``--overhead`` splits a decode step of the combined SmolLM2 (fp32 and INT4) into its weight
matmuls and everything else, by timing each model beside a copy whose linear layers are hollow
(they return zeros of the right shape): full - hollow is the matmuls' time. A low-bit format only
shrinks the first part, so at batch 1 the speedup is capped by the per-token rest (norms, rotary,
attention, the KV cache, Python), which fp32 and INT4 both pay.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import course_lib.pruned_modeling  # noqa: E402,F401  (registers the pruned model types)
from course_lib import quantize, timing, zoo  # noqa: E402
from course_lib.evaluate import forward_flops, storage_bytes  # noqa: E402
from course_lib.onnx_decoder import OrtDecoder  # noqa: E402
from course_lib.plan import PruningPlan  # noqa: E402
from course_lib.pruned_modeling import adapter_for  # noqa: E402
from course_lib.surgery import apply_plan  # noqa: E402


def structures(model) -> dict[str, PruningPlan]:
    """Fixed-index plans for each structural variant of ``model``."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    n = len(blocks)
    layers = list(range(n - 1 - n // 5, n - 1))  # 20% of the blocks, the last one kept
    kv = adapter.num_kv_heads(blocks[0])
    if kv < adapter.num_heads(blocks[0]):  # grouped-query attention: drop one KV group
        heads = {"kv_groups": {i: [kv - 1] for i in range(n)}}
    else:  # multi-head attention: drop a quarter of the heads
        heads = {"heads": {i: list(range(adapter.num_heads(blocks[0]) * 3 // 4, adapter.num_heads(blocks[0])))
                           for i in range(n)}}
    width = adapter.intermediate_size(blocks[0])
    aligned, unaligned = width * 3 // 4 // 64 * 64, width * 3 // 4 - 22  # 1536 -> 1152 and 1130
    ffn = lambda keep: {i: list(range(keep, width)) for i in range(n)}  # noqa: E731
    kept = [i for i in range(n) if i not in layers]
    return {
        "layers -20%": PruningPlan(layers=layers),
        "heads -1/3 KV" if "kv_groups" in heads else "heads -1/4": PruningPlan(**heads),
        f"FFN {width}->{aligned} (aligned)": PruningPlan(neurons=ffn(aligned)),
        f"FFN {width}->{unaligned} (unaligned)": PruningPlan(neurons=ffn(unaligned)),
        "combined": PruningPlan(layers=layers, neurons={i: ffn(aligned)[i] for i in kept},
                                **{key: {i: v for i, v in table.items() if i in kept} for key, table in heads.items()}),
    }


def torchao_int4(model):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = model.to(torch.bfloat16)
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=64, set_inductor_config=False),
              filter_fn=_block_linear_filter(model))
    return model


def torchao_int8_dynamic(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
              filter_fn=_block_linear_filter(model))
    return model


def _block_linear_filter(model):
    inside = {id(m) for block in adapter_for(model).blocks(model) for m in block.modules()
              if isinstance(m, torch.nn.Linear)}
    return lambda module, _: id(module) in inside


LOW_BIT = {"bf16": quantize.bf16, "int8 weight-only": quantize.int8,
           "int4 CPU kernel": lambda m: quantize.int4(m, None, group_size=64),
           "int4 onnxruntime": lambda m: OrtDecoder(quantize.int4(m, None, group_size=64)),
           "fp32 onnxruntime": OrtDecoder,
           "torchao int4 (same kernel)": torchao_int4, "torchao int8 dynamic": torchao_int8_dynamic}
# INT4 needs widths in groups of 64 (MiniLM: 384 ok); onnx_decoder writes decoders only
DECODER_ONLY = {"int4 CPU kernel", "int4 onnxruntime", "fp32 onnxruntime", "torchao int4 (same kernel)"}


def variants(model, decoder: bool) -> dict:
    found = {"dense": model}
    for name, plan in structures(model).items():
        found[name] = apply_plan(copy.deepcopy(model), plan)
    for name, make in LOW_BIT.items():
        if decoder or name not in DECODER_ONLY:
            found[f"combined, {name}"] = make(copy.deepcopy(found["combined"]))
    return found


def table(models: dict, results: dict, seq: int) -> list[dict]:
    """Rows of measured (median ratio of neighbouring samples, ``timing.paired_speedup``) and ideal speedups."""
    dense = models["dense"]
    dense_flops, dense_bytes = forward_flops(dense, 1, seq), storage_bytes(dense)
    flops = {name: forward_flops(m, 1, seq) for name, m in models.items() if "," not in name}
    base = results["dense"]
    rows = []
    for name, model in models.items():
        r = results[name]
        row_flops = flops.get(name, flops["combined"])  # low-bit: the same arithmetic as the model they round
        row = {"variant": name, "weight_mb": storage_bytes(model) / 1e6, **r,
               "prefill_speedup": timing.paired_speedup(base["prefill_samples_ms"], r["prefill_samples_ms"]),
               "prefill_ideal": dense_flops / row_flops}
        if r["decode_tokens_per_s"] is not None:
            row["decode_speedup"] = timing.paired_speedup(base["decode_step_ms"], r["decode_step_ms"])
            row["decode_ideal"] = dense_bytes / storage_bytes(model)
        rows.append(row)
    return rows


def _speedup(measured: float, ideal: float) -> str:
    return f"{measured:.2f}x / {ideal:.2f}x ({measured / ideal:.2f})"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| variant | weights MB | prefill ms (IQR) | prefill speedup / ideal (ratio) | decode tok/s (IQR) "
          "| decode speedup / ideal (ratio) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        prefill = _speedup(r["prefill_speedup"], r["prefill_ideal"])
        if r["decode_tokens_per_s"] is None:
            decode_rate = decode = "-"
        else:
            decode_rate = f"{r['decode_tokens_per_s']:.1f} ({r['decode_spread']:.1f})"
            decode = _speedup(r["decode_speedup"], r["decode_ideal"])
        print(f"| {r['variant']} | {r['weight_mb']:.1f} | {r['prefill_ms']:.1f} ({r['prefill_spread_ms']:.1f}) | "
              f"{prefill} | {decode_rate} | {decode} |", flush=True)


def kernels() -> None:
    """The bare aten calls on one 1536 x 576 linear (SmolLM2's gate_proj), batch 1 and 128."""
    from course_lib import lowbit

    weight = torch.randn(1536, 576)
    int4 = lowbit.Int4Linear.from_grid(*quantize.quantize_groups(weight, group_size=64))
    int8 = lowbit.Int8Linear.from_linear(torch.nn.Linear(576, 1536))
    print("| rows | fp32 ms | bf16 ms | int8 (bf16 act.) ms | int4 (bf16 act.) ms | int4 (fp32 act.) ms |")
    print("|---|---|---|---|---|---|")
    for rows in (1, 128):
        x = torch.randn(rows, 576)
        calls = {"fp32": lambda: torch.nn.functional.linear(x, weight),
                 "bf16": lambda: torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()),
                 "int8": lambda: int8(x),
                 "int4": lambda: int4(x),
                 "int4 fp32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                     x, int4.qweight, 64, int4.scales_and_zeros.float())}
        medians = {}
        for name, call in calls.items():
            times = []
            for _ in range(30):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            medians[name] = sorted(times)[15] * 1e3
        print(f"| {rows} | " + " | ".join(f"{medians[k]:.3f}" for k in calls) + " |")


def overhead(rounds: int, seq: int, new_tokens: int) -> dict:
    """Decode ms per token of the combined SmolLM2 in fp32 and INT4, split by ``timing.decode_breakdown``."""
    model = zoo.load_decoder()[0].eval()
    combined = apply_plan(copy.deepcopy(model), structures(model)["combined"])
    models = {"fp32": combined, "int4": quantize.int4(copy.deepcopy(combined), None, group_size=64)}
    rows = timing.decode_breakdown(models, seq=seq, new_tokens=new_tokens, rounds=rounds, progress=True)
    measured = timing.paired_speedup(rows["fp32"]["decode_step_ms"], rows["int4"]["decode_step_ms"])
    linear = rows["fp32"]["linear_ms"] / rows["int4"]["linear_ms"]
    print(f"\n### Decode step of the combined SmolLM2: {rounds} rounds, {new_tokens} tokens after {seq}\n")
    print("| model | step ms | linear layers ms (step - hollow) | everything else ms (hollow) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_ms']:.2f} | {r['linear_ms']:.2f} | {r['rest_ms']:.2f} |")
    print(f"\nINT4 / fp32 decode: measured {measured:.2f}x; the linear layers alone {linear:.2f}x")
    return {"rows": rows, "measured_speedup": measured, "linear_speedup": linear}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("smollm2", "minilm"), default=["smollm2", "minilm"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--kernels", action="store_true", help="time the bare kernels instead")
    parser.add_argument("--overhead", action="store_true",
                        help="split SmolLM2's decode step into linear layers and the rest instead")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.kernels:
        kernels()
        return 0
    if args.overhead:
        found = overhead(args.rounds, args.seq, args.new_tokens)
        if args.json:
            args.json.write_text(json.dumps(found, indent=2))
        return 0
    loaders = {"smollm2": lambda: zoo.load_decoder()[0], "minilm": lambda: zoo.load_encoder()[0]}
    everything = {}
    for name in args.models:
        model = loaders[name]().eval()
        models = variants(model, decoder=name == "smollm2")
        results = timing.compare(models, seq=args.seq, new_tokens=args.new_tokens, rounds=args.rounds, progress=True)
        everything[name] = table(models, results, args.seq)
        print_table(f"{name}: {args.rounds} rounds, prefill 1 x {args.seq}, decode {args.new_tokens} tokens",
                    everything[name])
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
