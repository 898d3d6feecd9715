"""Checks for the exercises of notebooks 00 (the models' shapes) and 01 (hardware and FLOPs).

Each check recomputes the answer another way (from the real modules, by brute force, or by
counting the FLOPs torch actually dispatches) and says what is wrong, not only that it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import check

# ----------------------------------------------------------------------------- notebook 00


def check_attention_params_per_head(model, per_query_head: int, per_kv_head: int) -> None:
    """Your per-head counts (from the config) against the weights the modules really hold.

    ``per_query_head``: the query-projection rows plus output-projection columns one query head
    owns (plus its share of the query bias, if the family has one). ``per_kv_head``: the key and
    value rows one key/value head owns (plus their biases).
    """
    from ..hardware import attention_parameters_per_head
    from ..pruned_modeling import adapter_for

    expected = attention_parameters_per_head(model)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    q, _, _ = adapter.qkv(block)
    hidden, head_dim = q.in_features, adapter.head_dim(model)
    for name, got in (("per_query_head", per_query_head), ("per_kv_head", per_kv_head)):
        check(isinstance(got, int) and not isinstance(got, bool),
              f"{name} should be an int, got {type(got).__name__} {got!r}")
    want_q, want_kv = expected["query_head"], expected["kv_head"]
    if per_query_head != want_q:
        hint = ""
        if per_query_head == want_q // 2:
            hint = (" -- that is half: a query head owns rows of the query projection AND columns of the "
                    "output projection")
        elif per_query_head == hidden * hidden:
            hint = f" -- {hidden} x {hidden} is the whole projection, not one head's {head_dim} rows of it"
        check(False, f"per_query_head={per_query_head} but the modules hold {want_q} per query head "
                     f"(hidden {hidden}, head_dim {head_dim}){hint}")
    if per_kv_head != want_kv:
        hint = ""
        if per_kv_head == want_kv // 2:
            hint = " -- that is half: a key/value head owns rows of the key projection AND of the value projection"
        elif per_kv_head == want_q:
            hint = " -- that is the query-head count: key/value heads have no output-projection columns of their own"
        check(False, f"per_kv_head={per_kv_head} but the modules hold {want_kv} per key/value head{hint}")


# ----------------------------------------------------------------------------- notebook 01


def _brute_round_down(width: int, multiple: int) -> int:
    """The largest multiple of ``multiple`` not above ``width``, found by walking down; at least ``multiple``."""
    candidate = width
    while candidate > multiple and candidate % multiple:
        candidate -= 1
    return max(candidate, multiple)


ROUNDING_CASES = [(7705, 64), (7705, 128), (11008, 64), (1075, 64), (1024, 64), (1023, 64), (1000, 128),
                  (64, 64), (63, 64), (1, 64), (1536, 256), (1153, 96)]


def check_round_down(fn: Callable[[int, int], int]) -> None:
    """``fn(width, multiple)`` must return the largest multiple of ``multiple`` that is <= ``width``,
    but never less than ``multiple`` (a layer keeps at least one tile of neurons)."""
    for width, multiple in ROUNDING_CASES:
        want = _brute_round_down(width, multiple)
        got = fn(width, multiple)
        check(isinstance(got, int) and not isinstance(got, bool),
              f"round_down({width}, {multiple}) returned {type(got).__name__} {got!r}: return an int")
        if got == want:
            continue
        if got % multiple:
            check(False, f"round_down({width}, {multiple}) = {got} is not a multiple of {multiple} (expected {want})")
        if got > width and width >= multiple:
            check(False, f"round_down({width}, {multiple}) = {got} is larger than {width}: round down, not to the "
                         f"nearest or up (expected {want})")
        if got < multiple:
            check(False, f"round_down({width}, {multiple}) = {got}: a pruned layer must keep at least one multiple "
                         f"({multiple}) (expected {want})")
        check(False, f"round_down({width}, {multiple}) = {got} but expected {want}: that is not the LARGEST multiple "
                     f"of {multiple} at or below {width}")


def counted_mlp_flops(tokens: int, hidden: int, intermediate: int, gated: bool) -> int:
    """FLOPs that torch dispatches for one MLP of the given shape, counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    n_in = 2 if gated else 1
    ins = [torch.nn.Linear(hidden, intermediate, bias=False, device="meta") for _ in range(n_in)]
    out = torch.nn.Linear(intermediate, hidden, bias=False, device="meta")
    x = torch.empty(tokens, hidden, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        h = ins[0](x)
        if gated:
            h = torch.nn.functional.silu(h) * ins[1](x)
        out(h)
    return int(counter.get_total_flops())


MLP_CASES = [(1, 576, 1536, True), (128, 576, 1536, True), (128, 576, 1024, True), (128, 576, 1075, True),
             (64, 384, 1536, False), (7, 384, 1000, False)]


def check_mlp_flops(fn: Callable[[int, int, int, bool], int]) -> None:
    """``fn(tokens, hidden, intermediate, gated)`` against the FLOPs torch counts for a real MLP.

    gated=True is the Llama MLP (gate, up, down projections); gated=False the BERT MLP (one
    projection in, one out). Elementwise work (activation, gating product) is not counted.
    """
    for tokens, hidden, intermediate, gated in MLP_CASES:
        want = counted_mlp_flops(tokens, hidden, intermediate, gated)
        got = fn(tokens, hidden, intermediate, gated)
        if got == want:
            continue
        kind = "gated (Llama: gate, up, down)" if gated else "plain (BERT: in, out)"
        ratio = got / want if want else float("nan")
        hint = ""
        if abs(ratio - 0.5) < 1e-9:
            hint = " -- half: a multiply-add is 2 FLOPs"
        elif gated and abs(ratio - 2 / 3) < 1e-9:
            hint = " -- two thirds: a gated MLP has THREE projections (gate, up, down)"
        elif not gated and abs(ratio - 1.5) < 1e-9:
            hint = " -- 1.5x: a plain MLP has only TWO projections, no gate"
        elif abs(ratio - 2) < 1e-9:
            hint = " -- twice: count 2 FLOPs per multiply-add, not 4"
        check(False, f"mlp_flops(tokens={tokens}, hidden={hidden}, intermediate={intermediate}, gated={gated}) = "
                     f"{got} but torch counts {want} for a {kind} MLP ({ratio:.3g}x){hint}")
