"""What a pruned shape costs on real hardware: timed matrix products, FLOPs, and cited GPU numbers.

Notebook 01 asks three questions of the learner's own machine, all through ``F.linear`` (the
operation inside every attention projection and MLP of a transformer):

* does time follow the output width, and do widths that are not multiples of 64/128 cost extra?
  (:func:`matmul_time`, :func:`width_sweep`, :func:`width_explorer`)
* does zeroing half of a weight's entries make a dense product faster, as slicing away half of
  its rows does? (:func:`unstructured_vs_structured`)
* how do the analytic FLOPs (``2 m k n``) compare with the measured time? (:func:`matmul_flops`,
  :attr:`Measurement.gflops`)

Timing discipline (the machine may be shared and noisy): warm-up calls first, then the median of
``repeats`` calls; sweeps visit the widths in a shuffled order, several rounds, and keep the
median over rounds, so a burst of load from elsewhere lands on a few points rather than on one
end of the curve. Comparisons are ratios measured in the same round.

What a CPU shows is not what a GPU shows, so the notebook also reads the course's GPU numbers from
``data/h200_measurements.md`` (:func:`h200_tables`), always citing them as "H200 measurements
(data/h200_measurements.md)".

Notebook 00 uses :func:`model_shapes` and :func:`parameter_breakdown` to show where a model's
parameters live. This module imports only torch at import time (ipywidgets when a widget is
built), so its timing functions also run on a machine that has nothing else installed.
"""

from __future__ import annotations

import random
import re
import statistics
import time
import warnings
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SettingError
from .paths import REPO_ROOT
from .timing import synchronize

H200_FILE = REPO_ROOT / "data" / "h200_measurements.md"
H200_SOURCE = "H200 measurements (data/h200_measurements.md)"
ALIGNMENTS = (64, 128)  # tile widths GPU matrix kernels work in (the lesson names 64x64 and 128x128)


# ----------------------------------------------------------------------------- sizes and devices


def resolve_device(profile) -> str:
    """The device a profile asks for, or ``"cpu"`` when it asks for CUDA and none is present."""
    wanted = getattr(profile, "device", profile)
    return "cuda" if wanted == "cuda" and torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class HardwareSizes:
    """Shapes and repetitions of the timing experiments; a profile changes these, never the code."""

    device: str
    dtype: torch.dtype
    tokens: int  # m: rows of the activation (batch x sequence)
    in_features: int  # k
    width: int  # n: the dense output width the experiments start from
    sweep_widths: tuple[int, ...]  # the fine sweep near ``width``: aligned and unaligned
    coarse_widths: tuple[int, ...]  # a wide sweep, to see time grow with width
    unaligned: tuple[int, ...]  # named unaligned widths near ``width``
    repeats: int  # timed calls per point (their median is the point)
    rounds: int  # passes over all points (their median is reported)
    explorer_range: tuple[int, int]  # the widget slider's min and max width
    threads: int | None  # CPU threads while timing (None: leave torch's setting alone)


def hardware_sizes(profile) -> HardwareSizes:
    """Experiment sizes for a profile: small fp32 products on a CPU, the H200 table's shape on a GPU.

    On a CPU (the ``ci`` profile, or ``full`` without a GPU) the products are 128 x 1024 x ~1024,
    about a millisecond each, so the sweeps take seconds. They run on **one thread**: with two or
    more, every product ends at a barrier where each thread waits for the slowest, and on a
    machine shared with other work one descheduled thread stalls the product for a scheduler time
    slice (measured on the course's shared 2-core machine: a 128-wide product took 16 ms on two
    threads and 0.3 ms on one). One thread times the arithmetic, not the scheduler; the shape of
    time against width is the same. On a GPU they are the shape of table 1 of the H200
    measurements (M = 2048, K = 4096, N around 7680 and 7705) in bf16.
    """
    device = resolve_device(profile)
    if device == "cuda":
        width, k, m = 7680, 4096, 2048  # 60 x 128, and half of it (3840) is still a multiple of 128
        sweep = range(7616, 7809, 4)
        coarse = (*range(1024, 11009, 1024), 7705, 11008)
        unaligned = (7700, 7705, 7743)
        dtype, repeats, rounds = torch.bfloat16, 20, 5
        explorer = (4096, 11008)
    else:
        width, k, m = 1024, 1024, 128
        sweep = range(960, 1089, 2)
        coarse = (*range(128, 2049, 128), 1000, 1500)
        unaligned = (1000, 1023, 1025, 1075)
        dtype, repeats = torch.float32, 5
        rounds = 3 if getattr(profile, "name", "ci") == "ci" else 5
        explorer = (64, 2048)
    widths = tuple(sorted(set(sweep) | set(unaligned) | {width}))
    threads = None if device == "cuda" else 1
    return HardwareSizes(device, dtype, m, k, width, widths, tuple(sorted(set(coarse))), unaligned, repeats, rounds,
                         explorer, threads)


# ----------------------------------------------------------------------------- FLOPs and timing


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of ``[m, k] @ [k, n]``: ``m n`` outputs, each ``k`` multiplies and ``k`` adds."""
    return 2 * m * k * n


def is_multiple(width: int, of: int) -> bool:
    return width % of == 0


@contextmanager
def cpu_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)``, restoring the old setting after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_call(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2,
              device: str | torch.device = "cpu", threads: int | None = None) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls.

    On CUDA each call is bracketed by CUDA events (kernels run asynchronously, so a host clock
    would time the launch, not the work). ``threads``: CPU threads while timing (see
    :func:`hardware_sizes` for why the course times on one).
    """
    if repeats < 1:
        raise SettingError(f"repeats must be at least 1, got {repeats}")
    with cpu_threads(threads):
        return _time_call(fn, repeats, warmup, device)


def _time_call(fn, repeats: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def _operands(m: int, k: int, n: int, device, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    weight = torch.randn(n, k, generator=generator).to(device=device, dtype=dtype)
    return x, weight


@torch.no_grad()
def matmul_time(m: int, k: int, n: int, repeats: int = 7, *, warmup: int = 2, device: str = "cpu",
                dtype: torch.dtype = torch.float32, threads: int | None = None, seed: int = 0) -> float:
    """Median seconds of ``F.linear(x, weight)`` with ``x`` [m, k] and ``weight`` [n, k].

    This is the product inside every ``nn.Linear`` of a transformer: ``m`` tokens, ``k`` input
    features, ``n`` output features (the width that structured pruning shrinks).
    """
    x, weight = _operands(m, k, n, device, dtype, seed)
    return statistics.median(time_call(lambda: F.linear(x, weight), repeats=repeats, warmup=warmup, device=device,
                                       threads=threads))


@dataclass(frozen=True)
class Measurement:
    """One timed ``F.linear`` shape: median (and best) seconds, and what they mean."""

    m: int
    k: int
    width: int
    seconds: float  # median
    best_seconds: float  # fastest observation (the least disturbed by other load)

    @property
    def flops(self) -> int:
        return matmul_flops(self.m, self.k, self.width)

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def gflops(self) -> float:
        """Achieved GFLOP/s at the median time."""
        return self.flops / self.seconds / 1e9

    @property
    def multiple_of_64(self) -> bool:
        return is_multiple(self.width, 64)

    @property
    def multiple_of_128(self) -> bool:
        return is_multiple(self.width, 128)


@torch.no_grad()
def width_sweep(m: int, k: int, widths: Iterable[int], *, repeats: int = 5, rounds: int = 3, warmup: int = 1,
                device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None,
                seed: int = 0) -> list[Measurement]:
    """Time ``F.linear`` at every output width in ``widths`` (sorted by width in the result).

    Every width slices the first ``n`` rows of one weight of the largest width, which is still a
    contiguous matrix: the product runs on exactly the tensor a row-pruned layer would hold. Each
    round visits the widths in a new shuffled order; a width's time is the median over rounds of
    the per-round medians, its best time the fastest call seen.
    """
    widths = sorted(set(int(w) for w in widths))
    if not widths or widths[0] < 1:
        raise SettingError(f"widths must be positive integers, got {widths}")
    x, full = _operands(m, k, widths[-1], device, dtype, seed)
    per_round: dict[int, list[float]] = {w: [] for w in widths}
    best: dict[int, float] = {w: float("inf") for w in widths}
    order = list(widths)
    rng = random.Random(seed)
    with cpu_threads(threads):
        for _ in range(rounds):
            rng.shuffle(order)
            for n in order:
                weight = full[:n]
                times = _time_call(lambda: F.linear(x, weight), repeats, warmup, device)
                per_round[n].append(statistics.median(times))
                best[n] = min(best[n], min(times))
    return [Measurement(m, k, n, statistics.median(per_round[n]), best[n]) for n in widths]


@dataclass(frozen=True)
class SparsityComparison:
    """Unstructured zeros against removed rows, as ratios to the dense time of the same round."""

    m: int
    k: int
    n: int
    sparsity: float
    dense_ms: float
    zeroed_ms: float  # same shape, ``sparsity`` of the entries set to zero
    sliced_ms: float  # ``round(n * (1 - sparsity))`` rows kept: a genuinely smaller matrix
    zeroed_ratio: float  # median over rounds of zeroed / dense (1.0 = no gain at all)
    sliced_ratio: float  # median over rounds of sliced / dense
    csr_ms: float | None = None  # the zeroed weight stored as a sparse CSR matrix
    csr_ratio: float | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)  # per-round median seconds of each variant
    best_ms: dict[str, float] = field(default_factory=dict)  # fastest call of each variant, all rounds
    csr_error: str | None = None  # why the CSR variant could not run here, if it could not

    @property
    def kept_rows(self) -> int:
        return round(self.n * (1 - self.sparsity))

    def best_ratio(self, name: str) -> float:
        """Fastest call of variant ``name`` over the fastest dense call: the least disturbed ratio."""
        return self.best_ms[name] / self.best_ms["dense"]


@torch.no_grad()
def unstructured_vs_structured(m: int, k: int, n: int, *, sparsity: float = 0.5, repeats: int = 5, rounds: int = 5,
                               warmup: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32,
                               threads: int | None = None, include_csr: bool = True, pattern: str = "random",
                               seed: int = 0) -> SparsityComparison:
    """Time one dense product against the same weight with ``sparsity`` of its entries zeroed
    (unstructured: same shape, same dense kernel) and against a weight with that share of its
    rows removed (structured: a smaller matrix). Optionally also the zeroed weight stored in a
    sparse CSR format, the usual way to ask a library to skip zeros.

    ``pattern`` says which entries are zeroed: ``"random"`` (a random ``sparsity`` share) or
    ``"2:4"`` (:func:`two_four_mask`, the two smallest magnitudes of every four; ``sparsity`` must
    then be 0.5). A dense kernel sees the same shape either way; the 2:4 pattern is what sparse
    tensor cores can skip, a CPU kernel cannot.

    Each round times all variants back to back; ratios are taken within a round and their
    median over rounds is reported, so slow drifts of the machine's load cancel out.
    """
    if not 0 < sparsity < 1:
        raise SettingError(f"sparsity must be strictly between 0 and 1, got {sparsity}")
    if pattern not in ("random", "2:4"):
        raise SettingError(f"pattern must be 'random' or '2:4', got pattern={pattern!r}", setting="pattern")
    if pattern == "2:4" and sparsity != 0.5:
        raise SettingError(f"pattern='2:4' zeroes exactly half of the entries: sparsity must be 0.5, "
                           f"got sparsity={sparsity}", setting="sparsity")
    x, weight = _operands(m, k, n, device, dtype, seed)
    if pattern == "2:4":
        keep = two_four_mask(weight)
    else:
        generator = torch.Generator().manual_seed(seed + 1)
        keep = (torch.rand(n, k, generator=generator) >= sparsity).to(device)
    zeroed = weight * keep
    sliced = weight[: round(n * (1 - sparsity))].contiguous()
    variants: dict[str, Callable[[], object]] = {
        "dense": lambda: F.linear(x, weight),
        "zeroed": lambda: F.linear(x, zeroed),
        "sliced": lambda: F.linear(x, sliced),
    }
    csr_error = None
    if include_csr:
        try:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and not the point here
                warnings.simplefilter("ignore", UserWarning)
                csr = zeroed.to_sparse_csr()
                x_t = x.t().contiguous()
                csr @ x_t  # [n, k] @ [k, m]: the same products, transposed
            variants["csr"] = lambda: csr @ x_t
        except (RuntimeError, NotImplementedError) as err:  # e.g. no sparse kernel for this dtype on this device
            csr_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    per_round = []
    best = {name: float("inf") for name in variants}
    with cpu_threads(threads):
        for _ in range(rounds):
            medians = {}
            for name, fn in variants.items():
                times = _time_call(fn, repeats, warmup, device)
                medians[name] = statistics.median(times)
                best[name] = min(best[name], min(times))
            per_round.append(medians)

    def median_of(name: str) -> float:
        return statistics.median(r[name] for r in per_round) * 1e3

    def ratio(name: str) -> float:
        return statistics.median(r[name] / r["dense"] for r in per_round)

    return SparsityComparison(
        m, k, n, sparsity, median_of("dense"), median_of("zeroed"), median_of("sliced"),
        ratio("zeroed"), ratio("sliced"),
        csr_ms=median_of("csr") if "csr" in variants else None, csr_ratio=ratio("csr") if "csr" in variants else None,
        csr_error=csr_error,
        rounds=per_round, best_ms={name: t * 1e3 for name, t in best.items()},
    )


# ----------------------------------------------------------------------------- 2:4 semi-structured masks


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask of NVIDIA's 2:4 pattern chosen by magnitude: in every group of four consecutive
    input weights (along ``in_features``, the last dimension), the two largest ``|w|`` are kept.

    Groups run along the input dimension because that is the dimension a sparse tensor core
    reduces over: it stores the two kept values of each group and 2-bit indices, and skips the
    rest. Ties are broken by ``topk``, so every group keeps exactly two entries.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise SettingError(f"weight must be 2-D [out, in] with in a multiple of 4, got shape {tuple(weight.shape)}",
                          setting="weight")
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return mask.reshape(weight.shape)


@torch.no_grad()
def mask_two_four(model: nn.Module) -> int:
    """Apply :func:`two_four_mask` in place to every ``nn.Linear`` inside the transformer blocks
    (attention and MLP projections; embeddings, heads and norms are left dense, as 2:4 recipes do).

    The shapes do not change: this is the accuracy side of 2:4 sparsity, to be measured with the
    course's usual evaluation; the speed side needs a sparse kernel. Returns the number of weights
    set to zero (half of every masked layer).
    """
    from .pruned_modeling import adapter_for

    zeroed = 0
    for block in adapter_for(model).blocks(model):
        for linear in (mod for mod in block.modules() if isinstance(mod, nn.Linear)):
            mask = two_four_mask(linear.weight)
            linear.weight.mul_(mask)
            zeroed += int((~mask).sum())
    return zeroed


# ----------------------------------------------------------------------------- the widget


class WidthExplorer:
    """The logic behind the width slider, in plain Python (pytest drives it without a browser).

    Setting ``slider.value`` (or calling :meth:`show`) times the chosen width and the nearest
    multiple of 64 at or below it, and writes a one-line verdict to ``output.value``. ``timer``
    maps ``(m, k, n)`` to seconds; it defaults to :func:`matmul_time` on the given device.
    """

    def __init__(self, m: int, k: int, *, repeats: int = 5, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, threads: int | None = None,
                 timer: Callable[[int, int, int], float] | None = None):
        self.m, self.k = m, k
        self.timer = timer or (lambda m_, k_, n_: matmul_time(m_, k_, n_, repeats, device=device, dtype=dtype,
                                                              threads=threads))
        self.slider = None
        self.output = None
        self.result: Measurement | None = None
        self.aligned: Measurement | None = None
        self.text = ""
        self.history: list[Measurement] = []

    def measure(self, width: int) -> Measurement:
        seconds = self.timer(self.m, self.k, width)
        return Measurement(self.m, self.k, width, seconds, seconds)

    def show(self, width: int) -> str:
        width = int(width)
        self.result = self.measure(width)
        self.history.append(self.result)
        aligned_width = max(64, width - width % 64)
        self.aligned = self.result if aligned_width == width else self.measure(aligned_width)
        self.text = self.describe(self.result, self.aligned)
        if self.output is not None:
            self.output.value = self.text
        return self.text

    @staticmethod
    def describe(result: Measurement, aligned: Measurement) -> str:
        flags = ", ".join(f"{'a' if result.width % a == 0 else 'not a'} multiple of {a}" for a in ALIGNMENTS)
        line = (f"width {result.width} ({flags}): {result.ms:.3f} ms, {result.gflops:.1f} GFLOP/s "
                f"for [{result.m}x{result.k}] @ [{result.k}x{result.width}]")
        if aligned.width != result.width:
            line += (f"; rounded down to {aligned.width}: {aligned.ms:.3f} ms, {aligned.gflops:.1f} GFLOP/s "
                     f"({result.seconds / aligned.seconds:.2f}x the time of the aligned width)")
        return line

    def on_change(self, change: dict) -> None:
        """The slider's observer: ``change["new"]`` is the new width."""
        self.show(change["new"])


def width_explorer(m: int, k: int, *, initial: int = 1000, low: int = 64, high: int = 2048, repeats: int = 5,
                   device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None,
                   timer: Callable[[int, int, int], float] | None = None):
    """A width slider (``continuous_update`` off: it times on release) and its :class:`WidthExplorer`.

    Returns ``(widget, explorer)``; the initial width is measured at once, so the widget shows a
    result without any interaction.
    """
    import ipywidgets as widgets

    explorer = WidthExplorer(m, k, repeats=repeats, device=device, dtype=dtype, threads=threads, timer=timer)
    explorer.slider = widgets.IntSlider(value=initial, min=low, max=high, step=1, description="width n",
                                        continuous_update=False, layout=widgets.Layout(width="480px"))
    explorer.output = widgets.Label()
    explorer.slider.observe(explorer.on_change, names="value")
    explorer.show(initial)
    return widgets.VBox([explorer.slider, explorer.output]), explorer


# ----------------------------------------------------------------------------- the H200 tables

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(cell: str) -> float | None:
    """The first number in a table cell (``"1.23x"`` -> 1.23, ``"4.38 ms (3.0 TB/s)"`` -> 4.38, ``"-"`` -> None)."""
    found = NUMBER.search(cell.replace(",", ""))
    return float(found.group(0)) if found else None


@dataclass(frozen=True)
class MarkdownTable:
    section: int  # the "## N." heading the table sits under
    title: str  # that heading's text
    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        if name not in self.header:
            raise KeyError(f"no column {name!r}; columns are {self.header}")
        return [row[self.header.index(name)] for row in self.rows]

    def row(self, first_cell: str) -> dict[str, str]:
        for row in self.rows:
            if row[0] == first_cell:
                return dict(zip(self.header, row))
        raise KeyError(f"no row {first_cell!r}; rows are {[r[0] for r in self.rows]}")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def h200_tables(path: str | Path = H200_FILE) -> list[MarkdownTable]:
    """Every table of the H200 measurements file, in order, tagged with its section number."""
    tables: list[MarkdownTable] = []
    section, title = 0, ""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        heading = re.match(r"^##\s+(\d+)\.\s*(.*)$", lines[i])
        if heading:
            section, title = int(heading.group(1)), heading.group(2).strip()
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s\-|:]+\|$", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append(MarkdownTable(section, title, header, rows))
            continue
        i += 1
    return tables


def h200_table(section: int, index: int = 0, path: str | Path = H200_FILE) -> MarkdownTable:
    """The ``index``-th table under section ``section`` of the H200 measurements."""
    found = [t for t in h200_tables(path) if t.section == section]
    if index >= len(found):
        raise KeyError(f"section {section} has {len(found)} table(s), asked for index {index}")
    return found[index]


# ----------------------------------------------------------------------------- where parameters live


def model_shapes(model: nn.Module) -> dict[str, int]:
    """Depth and widths of a supported model, read from its modules (not only its config)."""
    from .pruned_modeling import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    q, _, _ = adapter.qkv(block)
    return {
        "layers": len(adapter.blocks(model)),
        "hidden": q.in_features,
        "query_heads": adapter.num_heads(block),
        "kv_heads": adapter.num_kv_heads(block),
        "head_dim": adapter.head_dim(model),
        "ffn": adapter.intermediate_size(block),
        "vocab": model.get_input_embeddings().num_embeddings,
    }


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters of a supported model by kind: embeddings, attention, MLP and other (norms, pooler,
    an untied output head). Each tensor is counted once, so tied embeddings are not double counted
    and the parts sum to :func:`course_lib.evaluate.count_parameters`.
    """
    from .pruned_modeling import adapter_for

    adapter = adapter_for(model)
    kinds: dict[int, str] = {}
    for parameter in model.get_input_embeddings().parameters():
        kinds[id(parameter)] = "embeddings"
    for name, parameter in model.named_parameters():
        if "embeddings." in name and not re.search(r"layernorm|layer_norm", name, re.IGNORECASE):
            kinds.setdefault(id(parameter), "embeddings")  # BERT position and token-type tables
    for block in adapter.blocks(model):
        for linear in (*adapter.qkv(block), adapter.o_proj(block)):
            for parameter in linear.parameters():
                kinds[id(parameter)] = "attention"
        for linear in (*adapter.mlp_in(block), adapter.mlp_out(block)):
            for parameter in linear.parameters():
                kinds[id(parameter)] = "mlp"
    totals = {"embeddings": 0, "attention": 0, "mlp": 0, "other": 0}
    for parameter in {id(p): p for p in model.parameters()}.values():
        totals[kinds.get(id(parameter), "other")] += parameter.numel()
    return totals


def attention_parameters_per_head(model: nn.Module, layer: int = 0) -> dict[str, int]:
    """Weights (and biases) one query head and one key/value head own in ``layer``, read from the modules.

    A query head owns ``head_dim`` rows of the query projection and ``head_dim`` columns of the
    output projection; a key/value head owns ``head_dim`` rows of both the key and the value
    projection. The output projection's bias belongs to no head and is not counted.
    """
    from .pruned_modeling import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[layer]
    q, k, v = adapter.qkv(block)
    o = adapter.o_proj(block)
    n_q, n_kv = adapter.num_heads(block), adapter.num_kv_heads(block)

    def size(linear: nn.Linear, with_bias: bool = True) -> int:
        return linear.weight.numel() + (linear.bias.numel() if with_bias and linear.bias is not None else 0)

    return {"query_head": (size(q) + size(o, with_bias=False)) // n_q, "kv_head": (size(k) + size(v)) // n_kv}


def sweep_table(measurements: Sequence[Measurement], bytes_per_element: int = 4) -> list[dict[str, object]]:
    """Rows for printing a sweep: width, weight size, median and best ms, GFLOP/s and alignment."""
    return [{"width": r.width, "weight MiB": round(r.width * r.k * bytes_per_element / 2**20, 2),
             "ms": round(r.ms, 3), "best ms": round(r.best_seconds * 1e3, 3), "GFLOP/s": round(r.gflops, 1),
             "x64": r.multiple_of_64, "x128": r.multiple_of_128} for r in measurements]


def cpu_cache_bytes(cpu: int = 0, root: str | Path = "/sys/devices/system/cpu") -> dict[str, int]:
    """Data cache sizes of one CPU core as Linux reports them (``{"L1": ..., "L2": ..., "L3": ...}``,
    in bytes); an empty dict where sysfs does not say (other systems, some containers).

    Instruction caches are skipped. A weight larger than the private L2 must be streamed from the
    shared L3 or from memory, which other programs on the machine compete for.
    """
    sizes: dict[str, int] = {}
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for index in sorted(Path(root, f"cpu{cpu}", "cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        number, unit = (size[:-1], size[-1]) if size[-1] in units else (size, "")
        try:
            sizes[f"L{level}"] = int(number) * units.get(unit, 1)
        except ValueError:
            continue
    return sizes
