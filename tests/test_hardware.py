"""course_lib.hardware and its exercise checks: FLOPs, timing plumbing, the H200 tables, the
width widget driven headless, and the parameter accounting of notebook 00 on tiny models."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from course_lib.evaluate import count_parameters
from course_lib.exercises import CheckFailed
from course_lib.exercises.hardware import (
    check_attention_params_per_head,
    check_mlp_flops,
    check_round_down,
    counted_mlp_flops,
)
from course_lib.hardware import (
    H200_FILE,
    Measurement,
    WidthExplorer,
    attention_parameters_per_head,
    h200_table,
    h200_tables,
    hardware_sizes,
    is_multiple,
    matmul_flops,
    mask_two_four,
    matmul_time,
    model_shapes,
    parameter_breakdown,
    parse_number,
    resolve_device,
    sweep_table,
    time_call,
    two_four_mask,
    unstructured_vs_structured,
    width_explorer,
    width_sweep,
)
from course_lib.profiles import PROFILES

# ----------------------------------------------------------------------------- FLOPs and sizes


def test_matmul_flops_is_two_per_multiply_add():
    assert matmul_flops(1, 1, 1) == 2
    assert matmul_flops(2048, 4096, 7705) == 2 * 2048 * 4096 * 7705


def test_is_multiple():
    assert is_multiple(7680, 64) and is_multiple(7680, 128)
    assert not is_multiple(7705, 64)
    assert is_multiple(7744, 64) and not is_multiple(7744, 128)


def test_resolve_device_falls_back_to_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(PROFILES["full"]) == "cpu"
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(PROFILES["full"]) == "cuda"
    assert resolve_device(PROFILES["ci"]) == "cpu"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_sizes_hold_the_named_widths(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sizes = hardware_sizes(PROFILES[name])
    assert sizes.device == "cpu" and sizes.dtype == torch.float32
    assert sizes.width in sizes.sweep_widths and is_multiple(sizes.width, 64)
    assert set(sizes.unaligned) <= set(sizes.sweep_widths)
    assert all(not is_multiple(w, 64) for w in sizes.unaligned)
    assert list(sizes.sweep_widths) == sorted(set(sizes.sweep_widths))
    assert sizes.coarse_widths[0] < sizes.width < sizes.coarse_widths[-1]
    if name == "ci":  # ci keeps the sweep small: < 2000 calls of 128 x 1024 x ~1024 fp32 (~1 ms each)
        assert len(sizes.sweep_widths) * sizes.rounds * (sizes.repeats + 1) < 2000


def test_gpu_sizes_are_the_h200_table_shape(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sizes = hardware_sizes(PROFILES["full"])
    assert (sizes.device, sizes.dtype, sizes.tokens, sizes.in_features) == ("cuda", torch.bfloat16, 2048, 4096)
    assert 7705 in sizes.sweep_widths and 7680 in sizes.sweep_widths


# ----------------------------------------------------------------------------- timing plumbing


def test_time_call_warms_up_then_times_each_repeat():
    calls = []
    times = time_call(lambda: calls.append(1), repeats=4, warmup=3)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_matmul_time_is_a_positive_median():
    seconds = matmul_time(8, 16, 24, repeats=3, warmup=1)
    assert 0 < seconds < 1


def test_width_sweep_returns_every_width_sorted_with_its_flops():
    result = width_sweep(4, 32, [48, 16, 64, 16], repeats=2, rounds=2, warmup=0)
    assert [r.width for r in result] == [16, 48, 64]
    for r in result:
        assert r.flops == 2 * 4 * 32 * r.width and r.seconds > 0 and r.best_seconds <= r.seconds
        assert math.isclose(r.gflops, r.flops / r.seconds / 1e9)
    assert [row["x64"] for row in sweep_table(result)] == [False, False, True]
    with pytest.raises(ValueError, match="positive"):
        width_sweep(4, 32, [])


def test_unstructured_vs_structured_reports_ratios_per_round():
    cmp = unstructured_vs_structured(8, 64, 64, sparsity=0.5, repeats=2, rounds=3, warmup=1)
    assert cmp.kept_rows == 32 and len(cmp.rounds) == 3
    assert set(cmp.rounds[0]) == {"dense", "zeroed", "sliced", "csr"}
    assert cmp.zeroed_ratio > 0 and cmp.sliced_ratio > 0 and cmp.csr_ratio > 0
    assert set(cmp.best_ms) == {"dense", "zeroed", "sliced", "csr"} and cmp.best_ratio("dense") == 1.0
    assert cmp.best_ms["dense"] <= cmp.dense_ms
    without = unstructured_vs_structured(8, 64, 64, repeats=1, rounds=1, warmup=0, include_csr=False)
    assert without.csr_ms is None and without.csr_ratio is None
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_vs_structured(8, 64, 64, sparsity=1.0)


def test_unstructured_vs_structured_with_the_two_four_pattern():
    cmp = unstructured_vs_structured(8, 64, 64, repeats=1, rounds=1, warmup=0, include_csr=False, pattern="2:4")
    assert set(cmp.best_ms) == {"dense", "zeroed", "sliced"} and cmp.kept_rows == 32
    with pytest.raises(ValueError, match="sparsity=0.3"):
        unstructured_vs_structured(8, 64, 64, sparsity=0.3, pattern="2:4")
    with pytest.raises(ValueError, match="pattern='4:8'"):
        unstructured_vs_structured(8, 64, 64, pattern="4:8")


# ----------------------------------------------------------------------------- 2:4 masks


def test_two_four_mask_keeps_exactly_the_two_largest_of_every_four():
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    mask = two_four_mask(weight)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    groups, kept = weight.abs().reshape(6, 8, 4), mask.reshape(6, 8, 4)
    assert (kept.sum(-1) == 2).all(), "exactly 2 nonzeros per group of 4 consecutive inputs"
    smallest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = groups.masked_fill(kept, -1.0).amax(-1)
    assert (smallest_kept >= largest_dropped).all(), "every kept |w| is at least every dropped |w| of its group"
    # a hand-made row: groups (1, -5, 2, 0.5) and (0, 0, -3, 3) keep (-5, 2) and (-3, 3), whatever the sign
    row = torch.tensor([[1.0, -5.0, 2.0, 0.5, 0.0, 0.0, -3.0, 3.0]])
    assert two_four_mask(row).tolist() == [[False, True, True, False, False, False, True, True]]
    with pytest.raises(ValueError, match=r"weight.*\(4, 6\)"):
        two_four_mask(torch.zeros(4, 6))


def test_mask_two_four_masks_every_block_linear_and_nothing_else():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    zeroed = mask_two_four(model)
    block_linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert zeroed == sum(m.weight.numel() for m in block_linears) // 2
    for linear in block_linears:
        assert ((linear.weight != 0).reshape(linear.out_features, -1, 4).sum(-1) == 2).all()
    for name, p in model.named_parameters():
        if ".layers." not in name or "norm" in name:
            assert torch.equal(p, before[name]), f"{name} should stay dense"


def test_measurement_properties():
    r = Measurement(m=2, k=3, width=128, seconds=1e-3, best_seconds=5e-4)
    assert r.flops == 1536 and math.isclose(r.ms, 1.0) and math.isclose(r.gflops, 1536 / 1e-3 / 1e9)
    assert r.multiple_of_64 and r.multiple_of_128


# ----------------------------------------------------------------------------- the widget, headless


def fake_timer(m, k, n):
    """Time proportional to the work, doubled for widths that are not multiples of 64."""
    return matmul_flops(m, k, n) / 1e11 * (1 if n % 64 == 0 else 2)


def test_widget_measures_the_initial_width_without_interaction():
    widget, explorer = width_explorer(16, 32, initial=1000, timer=fake_timer)
    assert explorer.result.width == 1000 and explorer.aligned.width == 960
    assert explorer.output.value == explorer.text and "rounded down to 960" in explorer.text
    assert widget.children == (explorer.slider, explorer.output)


def test_widget_observer_recomputes_when_the_slider_moves():
    _, explorer = width_explorer(16, 32, initial=1000, timer=fake_timer)
    explorer.slider.value = 1075
    r = explorer.result
    assert r.width == 1075 and not r.multiple_of_64 and not r.multiple_of_128
    assert math.isclose(r.seconds, fake_timer(16, 32, 1075))
    assert math.isclose(r.gflops, 2 * 16 * 32 * 1075 / r.seconds / 1e9)  # = 50 with the fake timer
    assert explorer.aligned.width == 1024
    # the fake penalty: 1075 does 5% more work and pays 2x, so ~2.1x the aligned time
    assert "2.10x the time of the aligned width" in explorer.text
    assert "not a multiple of 64" in explorer.output.value

    explorer.slider.value = 1024
    assert explorer.result.multiple_of_64 and explorer.result.multiple_of_128
    assert explorer.aligned is explorer.result and "rounded down" not in explorer.text
    assert "a multiple of 64, a multiple of 128" in explorer.text

    explorer.slider.value = 1088  # 17 x 64: aligned to 64, not to 128
    assert explorer.result.multiple_of_64 and not explorer.result.multiple_of_128
    assert [m.width for m in explorer.history] == [1000, 1075, 1024, 1088]


def test_widget_never_rounds_below_one_tile():
    _, explorer = width_explorer(4, 8, initial=100, low=1, high=256, timer=fake_timer)
    explorer.slider.value = 10
    assert explorer.aligned.width == 64  # a layer keeps at least one tile of 64


def test_widget_slider_clamps_to_its_range():
    _, explorer = width_explorer(4, 8, initial=100, low=64, high=256, timer=fake_timer)
    explorer.slider.value = 5000
    assert explorer.result.width == 256


def test_widget_default_timer_really_times():
    _, explorer = width_explorer(4, 8, initial=70, low=64, high=128, repeats=2)
    assert explorer.result.seconds > 0 and explorer.aligned.width == 64


def test_explorer_works_without_ipywidgets():
    explorer = WidthExplorer(2, 2, timer=lambda m, k, n: 1.0)
    explorer.on_change({"new": 130})
    assert explorer.result.width == 130 and explorer.aligned.width == 128 and explorer.output is None


# ----------------------------------------------------------------------------- the H200 tables


def test_parse_number():
    assert parse_number("1.23x") == 1.23
    assert parse_number("4.38 ms (3.0 TB/s of weights)") == 4.38
    assert parse_number("-") is None
    assert parse_number("7705 (=0.7*11008)") == 7705
    assert parse_number("0.08x") == 0.08


def test_h200_tables_are_all_read():
    tables = h200_tables()
    assert [t.section for t in tables] == [1, 2, 3, 4, 5, 5]
    assert all(len(row) == len(t.header) for t in tables for row in t.rows)


def test_h200_table_1_tiling_numbers():
    table = h200_table(1)
    row = table.row("2048")
    assert parse_number(row["7705 (=0.7*11008)"]) == 1.327 and parse_number(row["7680"]) == 0.191
    # the file says 97 against 675 TFLOP/s at M = 2048
    assert round(matmul_flops(2048, 4096, 7705) / 1.327e-3 / 1e12) == 97
    assert round(matmul_flops(2048, 4096, 7680) / 0.191e-3 / 1e12) == 675
    with pytest.raises(KeyError, match="no row"):
        table.row("3")
    with pytest.raises(KeyError, match="no column"):
        table.column("N=1")


def test_h200_table_4_sparsity_was_slower_than_dense():
    speedups = [parse_number(s) for s in h200_table(4).column("speedup")]
    assert speedups == [0.08, 0.38, 0.70]


def test_h200_table_lookup_errors():
    assert h200_table(5, 1).header[0] == "batch x 128"
    with pytest.raises(KeyError, match="section 4 has 1"):
        h200_table(4, 1)


def test_h200_file_is_the_copy_in_data():
    assert H200_FILE.name == "h200_measurements.md" and H200_FILE.parent.name == "data"


# ----------------------------------------------------------------------------- where parameters live

TINY_LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=32)


def tiny_llama(tied=True, bias=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tied, attention_bias=bias)).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32)
    return BertModel(config).eval()


def test_model_shapes_reads_the_modules():
    assert model_shapes(tiny_llama()) == {"layers": 2, "hidden": 64, "query_heads": 4, "kv_heads": 2,
                                          "head_dim": 16, "ffn": 96, "vocab": 100}
    assert model_shapes(tiny_bert())["kv_heads"] == 4


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_breakdown_sums_to_the_count_llama(tied):
    model = tiny_llama(tied=tied)
    parts = parameter_breakdown(model)
    assert sum(parts.values()) == count_parameters(model)
    assert parts["embeddings"] == 100 * 64
    assert parts["attention"] == 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)
    assert parts["mlp"] == 2 * 3 * 64 * 96
    norms = (2 * 2 + 1) * 64
    assert parts["other"] == norms + (0 if tied else 100 * 64)  # an untied LM head is "other"


def test_parameter_breakdown_sums_to_the_count_bert():
    model = tiny_bert()
    parts = parameter_breakdown(model)
    assert sum(parts.values()) == count_parameters(model)
    assert parts["embeddings"] == (100 + 32 + 2) * 64  # word, position, token type; not the LayerNorm
    assert parts["attention"] == 2 * 4 * (64 * 64 + 64)
    assert parts["mlp"] == 2 * (64 * 96 + 96 + 96 * 64 + 64)


def test_attention_parameters_per_head():
    assert attention_parameters_per_head(tiny_llama()) == {"query_head": 2 * 16 * 64, "kv_head": 2 * 16 * 64}
    assert attention_parameters_per_head(tiny_llama(bias=True)) == {"query_head": 2 * 16 * 64 + 16,
                                                                    "kv_head": 2 * (16 * 64 + 16)}
    assert attention_parameters_per_head(tiny_bert()) == {"query_head": 2 * 16 * 64 + 16,
                                                          "kv_head": 2 * (16 * 64 + 16)}


# ----------------------------------------------------------------------------- exercise checks


def test_check_attention_params_accepts_the_config_formula():
    model = tiny_llama()
    c = model.config
    per_q = 2 * c.head_dim * c.hidden_size
    check_attention_params_per_head(model, per_q, 2 * c.head_dim * c.hidden_size)


@pytest.mark.parametrize("per_q, per_kv, message", [
    (16 * 64, 2 * 16 * 64, "that is half: a query head owns rows of the query projection AND columns"),
    (64 * 64, 2 * 16 * 64, "is the whole projection"),
    (2 * 16 * 64, 16 * 64, "owns rows of the key projection AND of the value projection"),
    (2.0 * 16 * 64, 2 * 16 * 64, "should be an int"),
])
def test_check_attention_params_says_what_is_wrong(per_q, per_kv, message):
    with pytest.raises(CheckFailed, match=message):
        check_attention_params_per_head(tiny_llama(), per_q, per_kv)


def test_check_round_down():
    check_round_down(lambda width, multiple: max(multiple, width // multiple * multiple))
    with pytest.raises(CheckFailed, match="larger than 1075: round down"):
        check_round_down(lambda w, m: max(m, round(w / m) * m))
    with pytest.raises(CheckFailed, match="must keep at least one multiple"):
        check_round_down(lambda w, m: w // m * m)
    with pytest.raises(CheckFailed, match="is not a multiple of 64"):
        check_round_down(lambda w, m: w - 1)
    with pytest.raises(CheckFailed, match="return an int"):
        check_round_down(lambda w, m: float(max(m, w // m * m)))


def test_counted_mlp_flops_matches_the_formula():
    assert counted_mlp_flops(3, 8, 12, gated=True) == 2 * 3 * 8 * 12 * 3
    assert counted_mlp_flops(3, 8, 12, gated=False) == 2 * 3 * 8 * 12 * 2


def test_check_mlp_flops():
    check_mlp_flops(lambda t, h, i, gated: 2 * t * h * i * (3 if gated else 2))
    with pytest.raises(CheckFailed, match="THREE projections"):
        check_mlp_flops(lambda t, h, i, gated: 2 * t * h * i * 2)
    with pytest.raises(CheckFailed, match="a multiply-add is 2 FLOPs"):
        check_mlp_flops(lambda t, h, i, gated: t * h * i * (3 if gated else 2))
    with pytest.raises(CheckFailed, match="only TWO projections"):
        check_mlp_flops(lambda t, h, i, gated: 2 * t * h * i * 3)


def test_timing_restores_the_thread_setting():
    before = torch.get_num_threads()
    time_call(lambda: torch.get_num_threads(), repeats=1, warmup=0, threads=1)
    width_sweep(2, 8, [8], repeats=1, rounds=1, warmup=0, threads=1)
    assert torch.get_num_threads() == before
    seen = []
    time_call(lambda: seen.append(torch.get_num_threads()), repeats=1, warmup=0, threads=1)
    assert seen == [1]


def test_cpu_sizes_time_on_one_thread(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware_sizes(PROFILES["ci"]).threads == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware_sizes(PROFILES["full"]).threads is None


def test_cpu_cache_bytes_reads_sysfs(tmp_path):
    from course_lib.hardware import cpu_cache_bytes

    for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "64K"),
                                             ("2", "Unified", "2048K"), ("3", "Unified", "491520K")]):
        d = tmp_path / "cpu0" / "cache" / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert cpu_cache_bytes(root=tmp_path) == {"L1": 48 * 1024, "L2": 2 * 2**20, "L3": 480 * 2**20}
    assert cpu_cache_bytes(root=tmp_path / "nowhere") == {}


def test_sweep_table_reports_the_weight_size():
    rows = sweep_table([Measurement(m=1, k=1024, width=512, seconds=1e-3, best_seconds=1e-3)])
    assert rows[0]["weight MiB"] == 2.0 and rows[0]["x64"]


def test_csr_variant_reports_why_it_cannot_run():
    # MKL has no sparse CSR kernel for bf16 on the CPU: the comparison still runs, without CSR
    cmp = unstructured_vs_structured(8, 64, 64, repeats=1, rounds=1, warmup=0, dtype=torch.bfloat16)
    assert cmp.csr_ms is None and cmp.csr_ratio is None and "csr" not in cmp.best_ms
    assert cmp.csr_error and "BFloat16" in cmp.csr_error
    assert cmp.sliced_ms > 0
