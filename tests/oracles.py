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
