"""Torch-Pruning 1.6.1 on the embedded SmolLM2, with its LLM example's settings, under our protocol.

    make bench-extras                                   # installs torch-pruning==1.6.1 (--no-deps)
    .venv/bin/python benchmarks/torch_pruning_baseline.py --ratio 0.1 0.2

Settings as in Torch-Pruning's ``examples/LLMs/prune_llm.py``: ``MetaPruner`` with the group L2
norm importance (``GroupNormImportance`` in the example; ``GroupMagnitudeImportance(p=2,
group_reduction="mean")`` in the 1.6.1 release), local (per-layer) pruning, ``pruning_ratio``
applied to the hidden size and the MLP, ``head_pruning_ratio`` the same, query/KV head counts
declared, head dimensions kept (RoPE), ``round_to=4``, the LM head ignored; afterwards the
attention and MLP attributes are updated as the example does. No calibration and no
reconstruction: that is the method. The hidden size shrinks too, so the share of the
decoder-layer parameters removed is printed beside each ratio (it is not the ratio).

Perplexity: the protocol of ``benchmarks/quality.py`` (64 x 512 held-out tokens, disjoint
windows). Attention runs eagerly: under SDPA the example's GQA tracing fails (the error is
printed when ``--sdpa`` is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402
import torch  # noqa: E402

from course_lib import zoo  # noqa: E402
from course_lib.budget import block_parameters  # noqa: E402


def prune(model, tokenizer, ratio: float):
    import torch_pruning as tp

    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    cfg = model.config
    num_heads = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads.update({attn.q_proj: cfg.num_attention_heads, attn.k_proj: cfg.num_key_value_heads,
                          attn.v_proj: cfg.num_key_value_heads})
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=inputs, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    model.config.hidden_size = model.lm_head.in_features
    for layer in model.model.layers:
        attn = layer.self_attn
        n_q = attn.q_proj.out_features // attn.head_dim
        n_kv = attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = n_q // n_kv
        model.config.num_attention_heads, model.config.num_key_value_heads = n_q, n_kv
        model.config.intermediate_size = layer.mlp.gate_proj.out_features
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--sdpa", action="store_true", help="keep SDPA attention (the example's default)")
    parser.add_argument("--json", default="reports/torch_pruning.json")
    args = parser.parse_args()
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("torch-pruning is not installed: run `make bench-extras` first", file=sys.stderr)
        return 2
    model, tok = zoo.load_decoder()
    if not args.sdpa:
        model.config._attn_implementation = "eager"
    ids = protocol.held_out_ids(tok)
    dense_blocks = block_parameters(model)
    dense = protocol.ppl(model, ids)
    rows = [{"variant": "dense", "removed_fraction": 0.0, "perplexity": dense}]
    print(f"dense perplexity {dense:.2f}")
    for ratio in args.ratio:
        try:
            pruned = prune(copy.deepcopy(model), tok, ratio)
        except Exception as error:  # noqa: BLE001 - the failure is the result to report
            traceback.print_exc()
            rows.append({"variant": f"torch-pruning ratio {ratio}", "error": f"{type(error).__name__}: {error}"})
            continue
        removed = 1 - block_parameters(pruned) / dense_blocks
        ppl = protocol.ppl(pruned, ids)
        rows.append({"variant": f"torch-pruning ratio {ratio}", "removed_fraction": removed, "perplexity": ppl,
                     "hidden_size": pruned.config.hidden_size})
        print(f"ratio {ratio}: hidden {pruned.config.hidden_size}, decoder-layer parameters removed {removed:.1%}, "
              f"perplexity {ppl:,.2f} ({ppl / dense:,.2f}x dense)", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
