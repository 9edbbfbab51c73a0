"""`otprune bench distance`: the cost of the per-image distance that records carry
(`otprune.distance`, `OTPRUNE_DISTANCE`) at LLaVA's token counts, to set its default against the
prefill's cost (issue #16: on by default only below 5% of a LLaVA-1.5 prefill).

Random features (seeded), K = round(ratio * N) random kept tokens; medians after a warm-up."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from otprune.distance import eq4_distance


@dataclasses.dataclass(frozen=True)
class DistanceTiming:
    n: int
    k: int
    dim: int
    eq4_ms: float
    w2_ms: float | None  # exact W2 (POT), None when not asked / not installed


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def run(sizes: tuple[int, ...] = (576, 2880), dim: int = 4096, ratio: float = 0.098, repeats: int = 5,
        exact: bool = False) -> list[DistanceTiming]:
    """Time Eq. 4 (and the exact W2 once, when `exact`) for each N of `sizes`."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        features = torch.randn(n, dim, generator=gen)
        k = max(1, int(round(ratio * n)))
        kept = torch.randperm(n, generator=gen)[:k]
        eq4 = _median_ms(lambda f=features, s=kept: eq4_distance(f, s), repeats)
        w2 = None
        if exact:
            from otprune.analysis.distances import wasserstein2

            wasserstein2(features[:4], kept[:1].clamp_max(3))  # warm-up: POT's import and first call
            start = time.perf_counter()
            wasserstein2(features, kept)
            w2 = (time.perf_counter() - start) * 1000.0
        out.append(DistanceTiming(n, k, dim, eq4, w2))
    return out


def format_table(rows: list[DistanceTiming]) -> str:
    lines = ["| N | K | D | Eq. 4 ms (eq4, default) | exact W2 ms (w2, POT) |", "|---|---|---|---|---|"]
    for row in rows:
        w2 = "-" if row.w2_ms is None else f"{row.w2_ms:.0f}"
        lines.append(f"| {row.n} | {row.k} | {row.dim} | {row.eq4_ms:.1f} | {w2} |")
    return "\n".join(lines)
