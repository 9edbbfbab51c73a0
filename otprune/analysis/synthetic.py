"""The paper's synthetic study (OTPrune paper Sec. 4, Table 2; docs/ALGORITHM.md section 8), as pure functions.

Protocol, per setting (n, d, k) and per seed:

1. Data: X = n i.i.d. standard Gaussian rows of d dims (`gaussian_data`, a fresh draw per seed).
2. Each method (`otprune.select_tokens` with OTPrune, DivPrune, DPP, random) picks k rows of X.
3. Every k-subset is scored by the trace objective Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2) of
   `otprune.analysis.distances` (higher is better; per-dimension normalised, zero-mean second moments as
   in the paper, or covariances with `centred=True`). All C(n, k) subsets when that count is
   at most `exhaustive_max`, otherwise `samples` subsets drawn uniformly at random (with
   replacement between draws, without replacement inside a subset).
4. For context, each method's subset also gets the exact W2 to all n points (POT,
   `otprune.analysis.distances.wasserstein2`), the paper's distance `paper_w2` (both traces at the
   value the normalisation fixes: decreasing in the trace objective, docs/ALGORITHM.md 9) and the
   closed-form W2 of the Gaussian fits with the subset's actual trace (`gaussian_w2`, not the
   paper's: Tr(Sigma_A) is not fixed for subsets of the normalised data).
5. Win rate of a method = share of the scored subsets whose objective is strictly lower than
   the method's (a subset within a relative 1e-9 of it is a tie: counted in `ties`, not as a
   win; in exhaustive mode the method's own subset is such a tie, so the maximum is
   1 - 1/C(n, k)). Optimality ratio = the method's objective / the best objective found, the
   best being taken over the scored subsets AND the subsets of all evaluated methods, so the
   denominator is common to all methods and the ratio is <= 1.

Speed: subsets are scored in chunks by `otprune.analysis.distances.TraceObjective` (one batched k x k
`eigvalsh` per chunk) on a pool of threads with one BLAS thread each (MKL's multi-threaded
eigensolver is far slower on small batched matrices). Scores are computed in float32 and every
decision that float32 could get wrong is re-done in float64: subsets within a relative `band`
(1e-4) of a method's value, and each chunk's top candidates for the best subset. A probe at the
start of every run measures the float32 error; if it is not well inside the band, the run
uses float64 throughout.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from otprune.analysis.distances import TraceObjective, gaussian_w2, paper_w2, wasserstein2
from otprune.selection import select_tokens

# The five (n, d, k) settings of Table 2.
SETTINGS: tuple[tuple[int, int, int], ...] = (
    (20, 10, 5),
    (30, 20, 10),
    (100, 50, 30),
    (100, 80, 50),
    (1000, 256, 100),
)

# The paper's Table 2 (percent): method -> (win rate, optimality ratio).
PAPER_TABLE2: dict[tuple[int, int, int], dict[str, tuple[float, float]]] = {
    (20, 10, 5): {"otprune": (94.56, 87.81), "divprune": (60.14, 74.53)},
    (30, 20, 10): {"otprune": (99.49, 93.98), "divprune": (84.62, 76.48)},
    (100, 50, 30): {"otprune": (99.99, 100.00), "divprune": (88.77, 92.20)},
    (100, 80, 50): {"otprune": (100.00, 100.00), "divprune": (92.14, 95.80)},
    (1000, 256, 100): {"otprune": (100.00, 100.00), "divprune": (97.59, 97.71)},
}

SYNTH_METHODS: tuple[str, ...] = ("otprune", "divprune", "dpp", "random")

TIE_RTOL = 1e-9  # subsets this close (relative) to a method's value are ties
FP32_BAND = 1e-4  # float32 scores this close (relative) to a decision threshold are re-scored in float64


# ----------------------------------------------------------------------------- data and subsets


def gaussian_data(n: int, d: int, seed: int) -> Tensor:
    """(n, d) float64 i.i.d. N(0, 1) entries from a CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, d, generator=generator, dtype=torch.float64)


def _binomial_table(n: int, k: int) -> Tensor:
    """table[c, i] = C(c, i) for c < n, i <= k, capped at 2^62 (int64), for unranking."""
    cap = 1 << 62
    rows = [[min(math.comb(c, i), cap) for i in range(k + 1)] for c in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def unrank_combinations(ranks: Tensor, n: int, k: int, table: Tensor | None = None) -> Tensor:
    """The k-subsets of range(n) with colexicographic ranks `ranks`: (B,) long -> (B, k) ascending.

    Combinatorial number system: rank = sum_i C(c_i, i) with c_k > ... > c_1 >= 0; c_i is the
    largest c with C(c, i) <= the remaining rank. Rank 0 is (0, 1, ..., k-1).
    """
    if table is None:
        table = _binomial_table(n, k)
    rest = ranks.clone()
    out = torch.empty(ranks.shape[0], k, dtype=torch.long)
    for i in range(k, 0, -1):
        column = table[:, i].contiguous()  # nondecreasing in c
        c = torch.searchsorted(column, rest, right=True) - 1
        out[:, i - 1] = c
        rest -= column[c]
    return out


def random_subsets(n: int, k: int, count: int, generator: torch.Generator) -> Tensor:
    """(count, k) ascending rows, each a uniformly random k-subset of range(n)."""
    keys = torch.rand(count, n, generator=generator)
    return keys.topk(k, dim=1).indices.sort(dim=1).values


def chunk_seed(seed: int, setting: tuple[int, int, int], chunk: int) -> int:
    """Independent, reproducible generator seed for Monte-Carlo chunk `chunk` of one run."""
    return int(np.random.SeedSequence([int(seed), *setting, int(chunk)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def method_subsets(
    x: Tensor, k: int, methods: Sequence[str], *, seed: int = 0, gamma: float = 0.01
) -> dict[str, Tensor]:
    """Each method's k picks on x: (n, d), ascending long (k,). Random uses `seed`, OTPrune `gamma`."""
    params: dict[str, dict[str, object]] = {"otprune": {"gamma": gamma}, "random": {"seed": int(seed)}}
    return {m: select_tokens(x, k, m, **params.get(m, {})) for m in methods}


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class ChunkStats:
    """What one scored chunk contributes: counts per method, sums, the chunk's best subset."""

    count: int
    wins: Tensor  # (M,) long
    ties: Tensor  # (M,) long
    total: float
    total_sq: float
    best: float
    best_subset: Tensor
    rescored: int


def score_chunk(
    scorer: TraceObjective,
    subsets: Tensor,
    values: Tensor,
    dtype: torch.dtype = torch.float32,
    band: float = FP32_BAND,
) -> ChunkStats:
    """Score subsets: (B, k) and compare with the methods' float64 objectives `values`: (M,).

    In float32, rows within `band` (relative) of a method's value or of the chunk's maximum are
    re-scored in float64, so every comparison and the chunk's best are exact up to `TIE_RTOL`.
    """
    scores = scorer(subsets, dtype).double()  # (B,)
    rescored = 0
    if dtype != torch.float64:
        slack = band * values.abs().clamp_min(1e-30)  # (M,)
        top = scores.max()
        near = ((scores[:, None] - values[None, :]).abs() <= slack[None, :]).any(1)
        near |= scores >= top - 2.0 * band * top.abs()
        rows = near.nonzero().squeeze(1)
        if rows.numel():
            scores[rows] = scorer(subsets[rows], torch.float64)
            rescored = int(rows.numel())
    tie = TIE_RTOL * values.abs().clamp_min(1e-30)
    diff = scores[:, None] - values[None, :]  # (B, M)
    best = int(scores.argmax())
    return ChunkStats(
        count=int(scores.numel()),
        wins=(diff < -tie).sum(0),
        ties=(diff.abs() <= tie).sum(0),
        total=float(scores.sum()),
        total_sq=float(scores.square().sum()),
        best=float(scores[best]),
        best_subset=subsets[best].clone(),
        rescored=rescored,
    )


def fp32_relative_error(scorer: TraceObjective, subsets: Tensor) -> float:
    """Max |f32 - f64| / |f64| of the trace objective over subsets: (B, k)."""
    exact = scorer(subsets, torch.float64)
    approx = scorer(subsets, torch.float32).double()
    return float(((approx - exact).abs() / exact.abs().clamp_min(1e-30)).max())


def default_chunk(k: int, d: int) -> int:
    """Subsets per chunk: about 2^19 matrix entries per batched eigvalsh, within [64, 16384]."""
    m = min(k, d)
    return int(min(16384, max(64, (1 << 19) // (m * m))))


@dataclasses.dataclass
class Plan:
    """How one setting is scored: all C(n, k) subsets ("exhaustive") or random ones ("monte-carlo")."""

    mode: str
    count: int
    chunk: int

    @property
    def chunks(self) -> int:
        return -(-self.count // self.chunk)


def plan_setting(n: int, k: int, d: int, samples: int, exhaustive_max: int, chunk: int | None = None) -> Plan:
    total = math.comb(n, k)
    size = chunk or default_chunk(k, d)
    if total <= exhaustive_max:
        return Plan("exhaustive", total, size)
    return Plan("monte-carlo", int(samples), size)


def _check_setting(n: int, d: int, k: int) -> None:
    for name, value in (("n", n), ("d", d), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"setting {name}={value!r}: must be an integer >= 1")
    if k >= n:
        raise ValueError(f"setting (n={n}, d={d}, k={k}): k must be smaller than n")


def run_setting(
    n: int,
    d: int,
    k: int,
    seed: int,
    *,
    samples: int = 10_000_000,
    exhaustive_max: int = 50_000_000,
    methods: Sequence[str] = SYNTH_METHODS,
    gamma: float = 0.01,
    centred: bool = False,
    dtype: torch.dtype = torch.float32,
    workers: int = 1,
    chunk: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """One (setting, seed) of the protocol in the module docstring. Returns a JSON-ready dict.

    `on_chunk(count)` is called after every scored chunk (for a progress bar). The caller sets
    the BLAS thread count (1 per worker thread is fastest).
    """
    _check_setting(n, d, k)
    if samples < 1 or exhaustive_max < 0:
        raise ValueError(f"samples={samples}, exhaustive_max={exhaustive_max}: need samples >= 1, exhaustive_max >= 0")
    start = time.perf_counter()
    setting = (n, d, k)
    x = gaussian_data(n, d, seed)
    scorer = TraceObjective(x, centred=centred)
    picks = method_subsets(x, k, methods, seed=seed, gamma=gamma)
    names = list(picks)
    values = scorer(torch.stack([picks[m] for m in names]), torch.float64)  # (M,)
    plan = plan_setting(n, k, d, samples, exhaustive_max, chunk)
    table = _binomial_table(n, k) if plan.mode == "exhaustive" else None

    def subsets_of(index: int) -> Tensor:
        lo = index * plan.chunk
        size = min(plan.chunk, plan.count - lo)
        if table is not None:
            return unrank_combinations(torch.arange(lo, lo + size), n, k, table)
        generator = torch.Generator().manual_seed(chunk_seed(seed, setting, index))
        return random_subsets(n, k, size, generator)

    fp32_error = None
    if dtype == torch.float32:
        fp32_error = fp32_relative_error(scorer, subsets_of(0)[:512])
        if fp32_error > FP32_BAND / 10:
            dtype = torch.float64  # float32 not accurate enough for this data: exact path throughout

    def task(index: int) -> ChunkStats:
        return score_chunk(scorer, subsets_of(index), values, dtype)

    wins = torch.zeros(len(names), dtype=torch.long)
    ties = torch.zeros(len(names), dtype=torch.long)
    count, total, total_sq, rescored = 0, 0.0, 0.0, 0
    best, best_subset = -math.inf, None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for stats in pool.map(task, range(plan.chunks)):
            count += stats.count
            wins += stats.wins
            ties += stats.ties
            total += stats.total
            total_sq += stats.total_sq
            rescored += stats.rescored
            if stats.best > best:
                best, best_subset = stats.best, stats.best_subset
            if on_chunk is not None:
                on_chunk(stats.count)

    best_scored = best
    method_values = {m: float(v) for m, v in zip(names, values, strict=True)}
    top_method = max(method_values, key=method_values.get)
    if method_values[top_method] > best:
        best, best_subset = method_values[top_method], picks[top_method]
    mean = total / count
    result_methods = {
        m: {
            "objective": method_values[m],
            "win_rate": int(wins[i]) / count,
            "wins": int(wins[i]),
            "ties": int(ties[i]),
            "optimality_ratio": method_values[m] / best,
            "w2": wasserstein2(x, picks[m]),
            "paper_w2": paper_w2(x, picks[m]) if not centred else None,  # the paper's (decreasing in f)
            "gaussian_w2": gaussian_w2(x, picks[m], centred=centred),  # actual-trace: not the paper's
            "subset": picks[m].tolist(),
        }
        for i, m in enumerate(names)
    }
    return {
        "n": n,
        "d": d,
        "k": k,
        "seed": int(seed),
        "mode": plan.mode,
        "subsets_scored": count,
        "subset_space": math.comb(n, k),
        "best": best,
        "best_scored": best_scored,
        "best_subset": best_subset.tolist(),
        "mean": mean,
        "std": math.sqrt(max(total_sq / count - mean * mean, 0.0)),
        "random_expected_ratio": mean / best,
        "methods": result_methods,
        "dtype": str(dtype).replace("torch.", ""),
        "fp32_max_rel_error": fp32_error,
        "rescored_fp64": rescored,
        "centred": centred,
        "gamma": gamma,
        "seconds": time.perf_counter() - start,
    }


def time_per_subset(
    n: int, d: int, k: int, *, dtype: torch.dtype = torch.float32, workers: int = 1, seconds: float = 2.0, chunk: int | None = None
) -> float:
    """Measured wall seconds per scored subset (random subsets, `workers` threads), for estimates."""
    _check_setting(n, d, k)
    x = gaussian_data(n, d, 0)
    scorer = TraceObjective(x)
    size = chunk or default_chunk(k, d)
    values = scorer(random_subsets(n, k, 4, torch.Generator().manual_seed(0)), torch.float64)
    generator = torch.Generator().manual_seed(1)
    batches = [random_subsets(n, k, size, generator) for _ in range(2 * max(1, workers))]
    scorer(batches[0][:8], dtype)  # warm up
    done, elapsed = 0, 0.0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while elapsed < seconds:
            t0 = time.perf_counter()
            list(pool.map(lambda b: score_chunk(scorer, b, values, dtype), batches))
            elapsed += time.perf_counter() - t0
            done += size * len(batches)
    return elapsed / done


# ----------------------------------------------------------------------------- summaries


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarise(runs: Sequence[dict]) -> dict:
    """Mean and sample std over seeds of win rate and optimality ratio (percent), per method."""
    out: dict[str, dict[str, float]] = {}
    for m in runs[0]["methods"]:
        wins = np.array([100.0 * r["methods"][m]["win_rate"] for r in runs])
        opts = np.array([100.0 * r["methods"][m]["optimality_ratio"] for r in runs])
        w2 = np.array([r["methods"][m]["w2"] for r in runs])
        out[m] = {
            "w2": float(w2.mean()),
            "win_rate": float(wins.mean()),
            "win_rate_std": _std(wins),
            "optimality_ratio": float(opts.mean()),
            "optimality_ratio_std": _std(opts),
        }
    ratios = np.array([100.0 * r["random_expected_ratio"] for r in runs])
    out["_random_expected"] = {"optimality_ratio": float(ratios.mean())}
    return out


def iter_table_rows(report: dict) -> Iterator[tuple[str, ...]]:
    """Rows (setting, mode, method, our win, our opt, paper win, paper opt) for `format_table`."""
    for entry in report["settings"]:
        setting = (entry["n"], entry["d"], entry["k"])
        paper = PAPER_TABLE2.get(setting, {})
        label = f"({entry['n']}, {entry['d']}, {entry['k']})"
        runs = entry["runs"]
        mode = f"{runs[0]['mode']} {runs[0]['subsets_scored']:,} x {len(runs)} seed{'s' if len(runs) > 1 else ''}"
        for m, s in entry["summary"].items():
            if m.startswith("_"):
                continue
            pw, po = paper.get(m, (None, None))
            spread = len(runs) > 1
            yield (
                label,
                mode,
                m,
                f"{s['win_rate']:.2f}" + (f" ± {s['win_rate_std']:.2f}" if spread else ""),
                f"{s['optimality_ratio']:.2f}" + (f" ± {s['optimality_ratio_std']:.2f}" if spread else ""),
                "-" if pw is None else f"{pw:.2f}",
                "-" if po is None else f"{po:.2f}",
            )
            label, mode = "", ""


def format_w2(report: dict) -> str:
    """One line per setting: each method's exact W2 to all points (mean over seeds)."""
    lines = []
    for entry in report["settings"]:
        values = ", ".join(f"{m} {s['w2']:.4f}" for m, s in entry["summary"].items() if not m.startswith("_"))
        lines.append(f"({entry['n']}, {entry['d']}, {entry['k']}): {values}")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """Our Table 2 beside the paper's, as aligned plain text."""
    header = ("(n, d, k)", "subsets scored", "method", "win % (ours)", "opt. % (ours)", "win % (paper)", "opt. % (paper)")
    rows = [header, *iter_table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
