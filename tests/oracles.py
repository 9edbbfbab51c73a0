"""Independent, deliberately naive reference implementations (numpy, fp64) for the tests."""

from __future__ import annotations

import numpy as np


def greedy_by_logdet(kernel: np.ndarray, k: int, min_gain: float | None = None) -> list[int]:
    """Greedy max of log det(kernel[A, A]) by evaluating slogdet for every candidate.

    With min_gain: once no candidate's gain det(A+i)/det(A) exceeds min_gain, fill the rest
    with the unpicked indices in ascending order (the documented DPP fallback).
    """
    n = kernel.shape[0]
    picked: list[int] = []
    base = 0.0
    while len(picked) < k:
        best, best_val = None, -np.inf
        for i in range(n):
            if i in picked:
                continue
            idx = picked + [i]
            sign, logdet = np.linalg.slogdet(kernel[np.ix_(idx, idx)])
            val = logdet if sign > 0 else -np.inf
            if val > best_val:  # strict: ties keep the lowest index
                best, best_val = i, val
        if min_gain is not None and (best is None or np.exp(best_val - base) <= min_gain):
            picked += [i for i in range(n) if i not in picked][: k - len(picked)]
            break
        picked.append(best)
        base = best_val
    return picked


def greedy_by_explicit_det(kernel: np.ndarray, k: int, rel_tol: float = 1e-9) -> list[int]:
    """Greedy max of det(kernel[A, A]) (fp64, an explicit determinant per candidate) with the
    official tie rule: among candidates whose det is within `rel_tol` of the best (an exact tie
    up to the rounding of the determinant), the lowest index."""
    n = kernel.shape[0]
    picked: list[int] = []
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        dets = [np.linalg.det(kernel[np.ix_(picked + [i], picked + [i])]) for i in rest]
        best = max(dets)
        picked.append(next(i for i, det in zip(rest, dets, strict=True) if det >= best - rel_tol * abs(best)))
    return picked


def otprune_kernel(x: np.ndarray, gamma: float = 0.01) -> np.ndarray:
    """L = I + gamma * S S^T with S = Xn Xn^T, Xn = X with unit-norm columns."""
    xn = x / np.sqrt((x**2).sum(axis=0, keepdims=True))
    s = xn @ xn.T
    return np.eye(len(x)) + gamma * s @ s.T


def cosine_kernel(x: np.ndarray) -> np.ndarray:
    """cos(x_i, x_j), with cos(x, x) = 1 exactly."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    kernel = unit @ unit.T
    np.fill_diagonal(kernel, 1.0)
    return kernel


def divprune_reference(x: np.ndarray, k: int) -> list[int]:
    """Max-min cosine-distance selection, straight from the definition."""
    n = len(x)
    dist = 1.0 - cosine_kernel(x)
    first = max(range(n), key=lambda i: (min((dist[i, j] for j in range(n) if j != i), default=np.inf), -i))
    picked = [first]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(dist[i, j] for j in picked), -i)))
    return picked


def logdet(kernel: np.ndarray, subset) -> float:
    idx = list(subset)
    if not idx:
        return 0.0
    return float(np.linalg.slogdet(kernel[np.ix_(idx, idx)])[1])


# PruMerge (tests/methods/test_prumerge.py, tests/llava/test_prumerge.py)
def prumerge_scores(q_cls: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(C,), (1 + N, C) -> (N,): softmax over all keys of q . k / sqrt(C), patch part."""
    logits = keys @ q_cls / np.sqrt(q_cls.shape[0])
    e = np.exp(logits - logits.max())
    return (e / e.sum())[1:]


def prumerge_outliers(scores: np.ndarray) -> list[int]:
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    return [i for i, s in enumerate(scores) if s > q3 + 1.5 * (q3 - q1)]


def prumerge_kept(scores: np.ndarray, plus: bool) -> tuple[list[int], list[int]]:
    """(attention picks by descending score, PruMerge+ samples ascending); K >= 1."""
    out = prumerge_outliers(scores)
    k = max(1, len(out))
    first = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    extra = []
    if plus:
        n = len(scores)
        stride = max(1, int(int(1 / (k / n)) / 3))
        extra = [p for p in range(0, n - 1, stride) if p not in first]
    return first, extra


def prumerge_merge(x: np.ndarray, keys: np.ndarray, scores: np.ndarray, kept: list[int], knn: int) -> np.ndarray:
    """Each kept p: x_p + sum of a_j x_j over its knn most key-cosine-similar other patches; then the summary."""
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    rows = []
    for p in kept:
        others = [j for j in range(len(x)) if j != p]
        others.sort(key=lambda j: -(unit[p] @ unit[j]))
        row = x[p].copy()
        for j in others[:knn]:
            row = row + scores[j] * x[j]
        rows.append(row)
    dropped = [j for j in range(len(x)) if j not in kept]
    rows.append(sum((scores[j] * x[j] for j in dropped), np.zeros(x.shape[1])))
    return np.stack(rows)


def eq4_high_precision(x: np.ndarray, kept, digits: int = 40) -> tuple[float, float, float]:
    """(f, Tr Sigma, Tr Sigma_A) of the paper's Eq. 4 in `digits`-digit arithmetic (mpmath):
    Z = x / rms per dimension, f = sum of the singular values of Z_A Z^T / sqrt(N K)."""
    import mpmath

    with mpmath.workdps(digits):
        rows = [[mpmath.mpf(float(v)) for v in row] for row in x]
        n, d = len(rows), len(rows[0])
        rms = [mpmath.sqrt(mpmath.fsum(rows[i][j] ** 2 for i in range(n)) / n) for j in range(d)]
        z = mpmath.matrix([[rows[i][j] / rms[j] for j in range(d)] for i in range(n)])
        za = mpmath.matrix([[z[int(i), j] for j in range(d)] for i in kept])
        k = za.rows
        f = mpmath.fsum(mpmath.svd_r(za * z.T, compute_uv=False)) / mpmath.sqrt(n * k)
        trace = mpmath.fsum(z[i, j] ** 2 for i in range(n) for j in range(d)) / n
        trace_a = mpmath.fsum(za[i, j] ** 2 for i in range(k) for j in range(d)) / k
        return float(f), float(trace), float(trace_a)
