"""Selection benchmark: each method's time, and OTPrune against its cost floor.

The floor is one `Xn @ Xn.T` product (N x N x D), which any method that looks at all token
pairs must pay. Timings are medians of repeated runs in one process; ratios are taken pair by
pair (A, B, A, B, ...) so that drifts of a shared machine cancel out.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import otprune
from otprune.methods.otprune import normalise_columns


@contextlib.contextmanager
def busy_neighbours(count: int):
    """Run `count` busy-loop Python processes (CPU contention, as on a shared machine) for the
    duration of the block; they are stopped (by their own process handles) on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, synchronised on GPUs (outside the call)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def paired(a: Callable[[], object], b: Callable[[], object], repeats: int, device: torch.device):
    """Median seconds of a and of b, and the median of the pairwise ratios a / b."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


EXTRA_METHODS = ("visionzip", "dart")  # timed beside the selection methods (not in otprune.METHODS)


def method_call(name: str, x: torch.Tensor, ratio: float) -> Callable[[], object]:
    """One call of method `name` on x: (N, D) keeping `ratio` of the tokens. The 2025 baselines get
    stand-in inputs of the right shapes: CDPruner a random relevance per token; VisionZip x as the
    tower's hidden state and keys (a CLS row prepended, 16 heads when D allows); DART x as the keys
    and hidden states, 32 text tokens after the image."""
    n, d = x.shape
    gen = torch.Generator().manual_seed(1)
    if name == "cdpruner":
        relevance = (torch.rand(1, n, generator=gen) + 1e-3).to(x.device)
        return lambda: otprune.select_tokens(x, ratio, name, relevance=relevance)
    if name == "visionzip":
        from otprune.methods.visionzip import VisionZip

        hidden = torch.cat([x[:1], x])[None]  # (1, 1 + N, D)
        heads = 16 if d % 16 == 0 else 1
        return lambda: VisionZip().merge_tower(hidden, hidden[:, 0], hidden, heads, ratio)
    if name == "dart":
        from otprune.methods.dart import dart_keep

        text = torch.randn(32, d, generator=gen).to(x.device)
        return lambda: dart_keep(x, x, text, text, round(ratio * n))
    return lambda: otprune.select_tokens(x, ratio, name)


@dataclass
class Row:
    n: int
    k: int
    floor_ms: float
    method_ms: dict[str, float]
    otprune_over_floor: float
    batch_per_sample_ms: float
    single_ms: float
    batch_over_single: float
    compiled: dict[str, tuple[float, float, float]] | None = None  # method -> (eager ms, compiled ms, compiled / eager)


def bench_size(
    x: torch.Tensor, xb: torch.Tensor, ratio: float, methods: list[str], repeats: int, progress=None,
    compile: bool = False,
) -> Row:
    """One row: x: (N, D) a single image's features, xb: (B, N, D) a batch. `compile`: also time each
    method's `select_tokens` eager vs compiled (`compiled=True`; the first call compiles, untimed)."""
    dev = x.device
    n, batch = x.shape[0], xb.shape[0]
    xn = normalise_columns(x[None])[0]
    ot_ms, floor_ms, ot_ratio = paired(lambda: otprune.select_tokens(x, ratio), lambda: xn @ xn.T, repeats, dev)
    method_ms = {}
    for name in methods:
        if progress:
            progress(f"N={n} {name}")
        if name == "otprune":
            method_ms[name] = ot_ms * 1e3
            continue
        fn = method_call(name, x, ratio)
        fn()
        method_ms[name] = statistics.median(timed(fn, dev) for _ in range(repeats)) * 1e3
    if progress:
        progress(f"N={n} batch of {batch}")
    batched = lambda: otprune.select_tokens(xb, ratio)  # noqa: E731
    singles = lambda: [otprune.select_tokens(xb[b], ratio) for b in range(batch)]  # noqa: E731
    tb, ts, b_ratio = paired(batched, singles, max(2, repeats // 2), dev)
    k = max(1, round(ratio * n))
    compiled = None
    if compile:
        compiled = {}
        for name in methods:
            if progress:
                progress(f"N={n} {name} eager vs compiled")
            compiled_s, eager_s, c_ratio = paired(
                lambda name=name: otprune.select_tokens(x, ratio, name, compiled=True),
                lambda name=name: otprune.select_tokens(x, ratio, name, compiled=False), repeats, dev,
            )  # fmt: skip
            compiled[name] = (eager_s * 1e3, compiled_s * 1e3, c_ratio)
    return Row(n, k, floor_ms * 1e3, method_ms, ot_ratio, tb / batch * 1e3, ts / batch * 1e3, b_ratio, compiled)


def run(
    sizes=(576, 1152, 2880),
    dim: int = 4096,
    ratio: float = 0.098,
    methods=None,
    repeats: int = 5,
    batch: int = 8,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    compile: bool = False,
) -> list[Row]:
    """The benchmark table's rows, one per N, on seeded Gaussian features (`compile`: see `bench_size`)."""
    dev = torch.device(device)
    methods = list(methods or [*otprune.METHODS, *EXTRA_METHODS])
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        x = torch.randn(n, dim, generator=gen).to(dev)
        xb = torch.randn(batch, n, dim, generator=gen).to(dev)
        rows.append(bench_size(x, xb, ratio, methods, repeats, progress, compile))
    return rows


def format_table(rows: list[Row], dim: int, ratio: float, device: str, busy: int = 0) -> str:
    methods = list(rows[0].method_ms)
    head = ["N", "K", "floor ms"] + [f"{m} ms" for m in methods] + ["OTPrune/floor", "batch/sample ms", "single ms", "batch/single"]
    lines = [
        f"Selection benchmark: D={dim}, ratio={ratio}, fp32, device={device}, torch threads={torch.get_num_threads()}"
        + (f", {busy} busy neighbour process(es)" if busy else ""),
        "floor = one Xn @ Xn.T; times are medians; ratios are medians of paired runs in this process",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r.n), str(r.k), f"{r.floor_ms:.1f}"] + [f"{r.method_ms[m]:.1f}" for m in methods]
        cells += [f"{r.otprune_over_floor:.2f}x", f"{r.batch_per_sample_ms:.1f}", f"{r.single_ms:.1f}", f"{r.batch_over_single:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows[0].compiled is not None:
        lines += [
            "",
            "Eager vs compiled (select_tokens(..., compiled=True): torch.compile(fullgraph=True), one image; "
            "eager on the CPU is the host loop); ratio = median of paired runs",
            "| N | method | eager ms | compiled ms | compiled/eager |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            for name, (eager_ms, compiled_ms, c_ratio) in r.compiled.items():
                lines.append(f"| {r.n} | {name} | {eager_ms:.1f} | {compiled_ms:.1f} | {c_ratio:.2f}x |")
    return "\n".join(lines)
