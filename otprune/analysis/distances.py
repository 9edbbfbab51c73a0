"""How well a kept subset of tokens matches the full set: exact OT and the paper's Gaussian surrogates.

All functions take the features of one image, `features: (N, D)`, and the kept token indices
`kept: (K,)` (or many candidate subsets `kept: (B, K)` where noted), and compute in float64.

- `wasserstein2`: the exact 2-Wasserstein distance between the uniform empirical distribution
  of all N tokens and that of the K kept tokens, solved as a linear program (network simplex)
  by POT's `ot.emd2` on the squared-Euclidean cost. Returns W2 itself, the square root of the
  optimal transport cost (the cost is W2^2). `wasserstein2_batch` does a padded batch of images.
- `gaussian_w2_squared`: the closed form for Gaussians,
  `W2^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)`.
- `trace_objective`: the paper's Eq. 4 (docs/ALGORITHM.md section 8), `Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2)`,
  higher is better; the quantity scored in the synthetic study (Table 2).
- `paper_w2`: the paper's distance, W2 with both traces fixed by the normalisation,
  sqrt(2 (Tr Sigma - f)) (docs/ALGORITHM.md 9); `gaussian_w2` keeps the subset's actual trace.
- `logdet_objective`: OTPrune's surrogate `log det L[A, A]`, L = I + gamma * S S^T (docs/ALGORITHM.md 1).

Moments used by the Gaussian surrogates (`gaussian_moments`). The paper fits ZERO-MEAN
Gaussians to the tokens and normalises every embedding dimension to unit variance (Sec. 3.3).
By default (`centred=False`) this module follows it literally:

    Z = X / rms(X)            every dimension divided by its root mean square over all N tokens
    Sigma   = Z^T Z / N       the second moment of all tokens (unit diagonal)
    Sigma_A = Z_A^T Z_A / K   the second moment of the kept tokens, on the same normalised Z

so Sigma is a second moment, not a covariance. This is the choice under which the paper's
log-det surrogate is OTPrune's kernel: with Xn = Z / sqrt(N) (unit-L2 columns, as
`otprune.methods.otprune.normalise_columns`) and S = Xn Xn^T, Sylvester's identity gives
`det(I_D + g Xn^T Xn Xn_A^T Xn_A) = det(I_K + g (S S^T)[A, A])`. With `centred=True` the
moments are covariances instead: Z = (X - mean) / std over all tokens, Sigma = Z^T Z / N, and
Sigma_A = the covariance of the kept rows of Z about their own mean. Constant factors (1/N, 1/K)
scale the trace objective of every K-subset alike, so win rates and optimality ratios do not
depend on them.

Fast subset scoring (`TraceObjective`): Sigma^1/2 Sigma_A Sigma^1/2 = Y_A^T H Y_A / K with
Y = Z Sigma^1/2 and H the K x K centring matrix (identity when uncentred). Its nonzero
eigenvalues are those of H M[A, A] H / K with M = Y Y^T = Z Sigma Z^T (N x N, precomputed once),
so a subset costs one K x K symmetric eigenvalue problem (or a D x D one when D < K); the
objective is the sum of the square roots of the eigenvalues (negatives from rounding clamped to 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from otprune.distance import cross_root_trace, eq4_terms, rms_normalised
from otprune.methods.otprune import interaction, normalise_columns

__all__ = [
    "GaussianMoments",
    "TraceObjective",
    "gaussian_moments",
    "gaussian_w2",
    "gaussian_w2_squared",
    "logdet_objective",
    "paper_w2",
    "sqrtm_psd",
    "trace_objective",
    "wasserstein2",
    "wasserstein2_batch",
    "wasserstein2_between",
]

ArrayLike = Tensor | np.ndarray | Sequence


# ----------------------------------------------------------------------------- input checks


def _features(features: ArrayLike, name: str = "features", dims: int = 2) -> Tensor:
    """Any array-like -> float64 tensor of `dims` dimensions, finite, non-empty."""
    x = torch.as_tensor(features)
    if x.dim() != dims or 0 in x.shape:
        shape = "(N, D)" if dims == 2 else "(B, N, D)"
        raise ValueError(f"{name}: must have shape {shape} with every size >= 1, got {tuple(x.shape)}")
    if not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise ValueError(f"{name}: must be real numbers, got dtype {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def _indices(kept: ArrayLike, n: int, name: str = "kept", batched: bool = False) -> Tensor:
    """Index array -> long tensor (K,) (or (B, K) when batched allowed), each in [0, n), no repeats."""
    idx = torch.as_tensor(kept)
    allowed = (1, 2) if batched else (1,)
    if idx.dim() not in allowed or 0 in idx.shape:
        shape = "(K,) or (B, K)" if batched else "(K,)"
        raise ValueError(f"{name}: must have shape {shape} with K >= 1, got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
        raise ValueError(f"{name}: must be integer token indices, got dtype {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.long)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{name}: indices must be in [0, {n - 1}] (N = {n} tokens), got min {lo}, max {hi}")
    rows = idx.reshape(-1, idx.shape[-1]).sort(dim=1).values
    if bool((rows[:, 1:] == rows[:, :-1]).any()):
        raise ValueError(f"{name}: contains a repeated index; a kept subset lists each token once")
    return idx


# ----------------------------------------------------------------------------- exact OT (POT)


def wasserstein2_between(x: ArrayLike, y: ArrayLike, *, num_iter_max: int = 10_000_000) -> float:
    """Exact W2 between the uniform empirical distributions of point sets x: (N, D) and y: (M, D).

    Solved by POT's network simplex `ot.emd2` on the cost C[i, j] = ||x_i - y_j||^2 (computed from
    the differences, so a set against itself gives exactly 0) with weights
    1/N and 1/M, in float64. Returns sqrt(optimal cost). RuntimeError if the solver stops at
    `num_iter_max` iterations before reaching the optimum.
    """
    import ot  # POT; the `analysis` extra

    xs, ys = _features(x, "x"), _features(y, "y")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y: must have the same dimension D, got {xs.shape[1]} and {ys.shape[1]}")
    a = np.full(xs.shape[0], 1.0 / xs.shape[0])
    b = np.full(ys.shape[0], 1.0 / ys.shape[0])
    # Exact differences, not the ||x||^2 + ||y||^2 - 2<x, y> shortcut, so identical points cost 0.
    cost = torch.cdist(xs, ys, compute_mode="donot_use_mm_for_euclid_dist").square().numpy()
    value, log = ot.emd2(a, b, cost, numItermax=int(num_iter_max), log=True)
    if log["result_code"] != 1:
        raise RuntimeError(
            f"ot.emd2 did not reach the optimum ({log['warning']}); raise num_iter_max (now {num_iter_max})"
        )
    return float(np.sqrt(max(float(value), 0.0)))


def wasserstein2(features: ArrayLike, kept: ArrayLike, *, num_iter_max: int = 10_000_000) -> float:
    """Exact 2-Wasserstein distance between all tokens and the kept tokens of one image.

    Args:
        features: (N, D) token features (any real dtype; computed in float64).
        kept: (K,) distinct indices of the kept tokens.
        num_iter_max: iteration cap of POT's network simplex (RuntimeError when hit).

    Returns:
        W2 (not squared) between the uniform distributions on the N rows and on the K kept rows:
        sqrt(min over couplings of sum_ij P_ij ||x_i - x_j||^2), solved exactly by `ot.emd2`.
        0 when every token is kept.
    """
    x = _features(features)
    idx = _indices(kept, x.shape[0])
    return wasserstein2_between(x, x[idx], num_iter_max=num_iter_max)


def wasserstein2_batch(
    features: ArrayLike,
    kept: ArrayLike,
    lengths: ArrayLike | None = None,
    *,
    num_iter_max: int = 10_000_000,
) -> Tensor:
    """`wasserstein2` for a padded batch: features (B, N, D), kept (B, K_max) padded with -1.

    Rows at positions >= lengths[b] are padding (default: all N rows are real); -1 entries of
    `kept` are padding (the layout `otprune.select_tokens` returns). Each image is its own
    exact OT problem, solved one after the other. Returns (B,) float64.
    """
    x = _features(features, dims=3)
    bsz, n, _ = x.shape
    idx = torch.as_tensor(kept)
    if idx.dim() != 2 or idx.shape[0] != bsz:
        raise ValueError(f"kept: must have shape ({bsz}, K_max) padded with -1, got {tuple(idx.shape)}")
    if lengths is None:
        lens = [n] * bsz
    else:
        lens_t = torch.as_tensor(lengths)
        if lens_t.shape != (bsz,) or lens_t.dtype.is_floating_point:
            raise ValueError(f"lengths: must be {bsz} integers, got shape {tuple(lens_t.shape)} dtype {lens_t.dtype}")
        lens = [int(v) for v in lens_t]
        if min(lens) < 1 or max(lens) > n:
            raise ValueError(f"lengths: every value must be in [1, {n}], got {lens}")
    out = torch.empty(bsz, dtype=torch.float64)
    for b in range(bsz):
        row = idx[b][idx[b] >= 0]
        out[b] = wasserstein2(x[b, : lens[b]], row, num_iter_max=num_iter_max)
    return out


# ----------------------------------------------------------------------------- Gaussian closed forms


def sqrtm_psd(mat: Tensor) -> Tensor:
    """Symmetric PSD square root of mat: (..., D, D) by eigendecomposition (negative eigenvalues -> 0)."""
    sym = 0.5 * (mat + mat.mT)
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp_min(0.0).sqrt()[..., None, :]) @ evecs.mT


def gaussian_w2_squared(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    """Squared W2 between N(mean1, cov1) and N(mean2, cov2); batched over leading dimensions.

    `||m1 - m2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2)` for PSD S1, S2: (..., D, D),
    means (..., D). The last trace is the sum of square roots of the eigenvalues of the PSD
    matrix S1^1/2 S2 S1^1/2 (negative rounding clamped). Result clamped at >= 0; float64.
    """
    m1, m2 = (torch.as_tensor(m).to(torch.float64) for m in (mean1, mean2))
    s1, s2 = (torch.as_tensor(s).to(torch.float64) for s in (cov1, cov2))
    if s1.shape[-2:] != s2.shape[-2:] or s1.shape[-1] != s1.shape[-2] or m1.shape[-1] != s1.shape[-1]:
        raise ValueError(
            f"gaussian_w2_squared: means (..., D) and covariances (..., D, D) must agree, got "
            f"{tuple(m1.shape)}, {tuple(s1.shape)}, {tuple(m2.shape)}, {tuple(s2.shape)}"
        )
    root1 = sqrtm_psd(s1)
    cross = root1 @ s2 @ root1
    cross_trace = torch.linalg.eigvalsh(0.5 * (cross + cross.mT)).clamp_min(0.0).sqrt().sum(-1)
    trace1 = s1.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace2 = s2.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((m1 - m2).square().sum(-1) + trace1 + trace2 - 2.0 * cross_trace).clamp_min(0.0)


@dataclasses.dataclass(frozen=True)
class GaussianMoments:
    """A Gaussian fit: mean (D,) and second moment or covariance `cov` (D, D), float64."""

    mean: Tensor
    cov: Tensor


def _normalised(x: Tensor, centred: bool) -> Tensor:
    """Z of the module docstring: per-dimension unit second moment (or unit variance if centred)."""
    return rms_normalised(x - x.mean(0) if centred else x)


def gaussian_moments(
    features: ArrayLike, kept: ArrayLike, *, centred: bool = False
) -> tuple[GaussianMoments, GaussianMoments]:
    """The Gaussian fits (all tokens, kept tokens) of the module docstring, on normalised features.

    centred=False (the paper's zero-mean Gaussians): means are reported (for the full W2) but the
    matrices are second moments Z^T Z / N and Z_A^T Z_A / K. centred=True: covariances.
    """
    z = _normalised(_features(features), centred)
    idx = _indices(kept, z.shape[0])
    za = z[idx]
    mean_all, mean_kept = z.mean(0), za.mean(0)
    if centred:
        za_c = za - mean_kept
        return GaussianMoments(mean_all, z.mT @ z / z.shape[0]), GaussianMoments(mean_kept, za_c.mT @ za_c / za.shape[0])
    return GaussianMoments(mean_all, z.mT @ z / z.shape[0]), GaussianMoments(mean_kept, za.mT @ za / za.shape[0])


def gaussian_w2(features: ArrayLike, kept: ArrayLike, *, centred: bool = False) -> float:
    """Closed-form W2 between the Gaussian fits of all and of the kept tokens (`gaussian_moments`),
    with the kept tokens' ACTUAL second moment (not the paper's distance: `paper_w2`).

    Uncentred (default): zero-mean Gaussians, W2^2 = Tr(Sigma) + Tr(Sigma_A) - 2 f with f =
    `trace_objective`. Centred: the full form including ||mu - mu_A||^2. f is the nuclear norm
    of a K x N factor (`otprune.distance.cross_root_trace`): no matrix square root is formed.
    """
    z = _normalised(_features(features), centred)
    idx = _indices(kept, z.shape[0])
    za = z[idx]
    shift = torch.zeros((), dtype=z.dtype)
    if centred:
        shift = (za.mean(0) - z.mean(0)).square().sum()
        za = za - za.mean(0)
    value = shift + z.square().sum() / z.shape[0] + za.square().sum() / za.shape[0] - 2.0 * cross_root_trace(z, za)
    return float(value.clamp_min(0.0).sqrt())


def paper_w2(features: ArrayLike, kept: ArrayLike) -> float:
    """The paper's distance (`otprune.distance.paper_distance`, the records' default `eq4`): W2 of
    the zero-mean Gaussian fits with both traces at the value the per-dimension normalisation
    fixes, sqrt(2 (Tr Sigma - f)) (negative root when f > Tr Sigma); decreasing in f. The same
    computation as the records' (`otprune.distance.eq4_terms`), after this module's input checks."""
    x = _features(features)
    return eq4_terms(x, _indices(kept, x.shape[0])).paper


class TraceObjective:
    """Batched scorer of the trace objective Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2) for many subsets.

    Precomputes, for one feature set X: (N, D), the N x N matrix M = Z Sigma Z^T (see the module
    docstring); scoring a batch of K-subsets is then a gather of M[A, A], optional double
    centring, and one batched K x K `eigvalsh` (a D x D one via Y = Z Sigma^1/2 when D < K).

    Args:
        features: (N, D).
        centred: covariances instead of second moments (module docstring).

    Call with `subsets: (B, K)` long (each row distinct indices, not checked on this hot path)
    and `dtype` (torch.float64 default, or torch.float32: faster, about 1e-6 relative error) ->
    (B,) scores in that dtype.

    The eigenvalues of M[A, A] are squared singular values, so eigenvalues below ~eps x the
    largest are lost to rounding: fine for the synthetic study's full-rank Gaussian data; on
    low-rank or duplicate-heavy features use `trace_objective` (the singular-value route).
    """

    def __init__(self, features: ArrayLike, *, centred: bool = False) -> None:
        z = _normalised(_features(features), centred)
        self.n, self.d = z.shape
        self.centred = centred
        s = z @ z.mT  # (N, N)
        self._m = {torch.float64: s @ s / self.n}  # M = Z (Z^T Z / N) Z^T
        self._y: dict[torch.dtype, Tensor] = {}
        self._z = z

    def kernel(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """M = Z Sigma Z^T: (N, N) in `dtype` (cached)."""
        if dtype not in self._m:
            self._m[dtype] = self._m[torch.float64].to(dtype)
        return self._m[dtype]

    def _whitened(self, dtype: torch.dtype) -> Tensor:
        """Y = Z Sigma^1/2: (N, D) in `dtype` (cached); for the D x D route."""
        if dtype not in self._y:
            z = self._z
            self._y[dtype] = (z @ sqrtm_psd(z.mT @ z / self.n)).to(dtype)
        return self._y[dtype]

    def matrices(self, subsets: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """The PSD matrices whose eigenvalues' square roots sum to the objective: (B, m, m), m = min(K, D)."""
        k = subsets.shape[-1]
        if k <= self.d:
            m = self.kernel(dtype)
            p = torch.take(m, subsets[:, :, None] * self.n + subsets[:, None, :])  # (B, K, K) = M[A, A]
            if self.centred:
                p = p - p.mean(1, keepdim=True) - p.mean(2, keepdim=True) + p.mean((1, 2), keepdim=True)
            return p / k
        ya = self._whitened(dtype)[subsets]  # (B, K, D)
        if self.centred:
            ya = ya - ya.mean(1, keepdim=True)
        return ya.mT @ ya / k

    def __call__(self, subsets: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        p = self.matrices(subsets, dtype)
        return torch.linalg.eigvalsh(p).clamp_min(0.0).sqrt().sum(-1)


def trace_objective(features: ArrayLike, kept: ArrayLike, *, centred: bool = False) -> Tensor:
    """The paper's trace objective Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2) (higher = closer match).

    Args:
        features: (N, D).
        kept: (K,) one subset -> 0-dim tensor, or (B, K) many subsets -> (B,); float64.
        centred: covariances instead of the paper's zero-mean second moments (module docstring).

    Computed as the nuclear norm of Z_A Z^T / sqrt(N K) (`otprune.distance.cross_root_trace`;
    accurate on low-rank, non-zero-mean and duplicate-heavy features), not by `TraceObjective`'s
    fast eigenvalue route. Keeping every token gives Tr(Sigma) = D (uncentred; D minus the number
    of constant dimensions in general).
    """
    x = _features(features)
    idx = _indices(kept, x.shape[0], batched=True)
    z = _normalised(x, centred)
    za = z[idx.reshape(-1, idx.shape[-1])]  # (B, K, D)
    if centred:
        za = za - za.mean(1, keepdim=True)
    values = cross_root_trace(z, za)
    return values[0] if idx.dim() == 1 else values


# ----------------------------------------------------------------------------- OTPrune's surrogate


def logdet_objective(features: ArrayLike, kept: ArrayLike, gamma: float = 0.01) -> Tensor:
    """OTPrune's objective log det L[A, A], L = I + gamma * S S^T, S = Xn Xn^T (docs/ALGORITHM.md 1).

    Xn is `features` with every dimension scaled to unit L2 norm over all N tokens
    (`otprune.methods.otprune.normalise_columns`); L[A, A] = I + gamma * S[A, :] S[A, :]^T is
    formed from the K rows of S, never the N x N matrix L.

    Args:
        features: (N, D).
        kept: (K,) -> 0-dim tensor, or (B, K) subsets -> (B,); float64.
        gamma: the kernel scale (paper default 0.01), > 0.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma={gamma!r}: must be a number > 0 (paper default 0.01)")
    x = _features(features)
    idx = _indices(kept, x.shape[0], batched=True)
    s = interaction(normalise_columns(x[None]))[0]  # (N, N)
    rows = idx.reshape(-1, idx.shape[-1])  # (B, K)
    s_rows = s[rows]  # (B, K, N): S[A, :]
    eye = torch.eye(rows.shape[1], dtype=x.dtype)
    kernel = eye + gamma * s_rows @ s_rows.mT  # (B, K, K)
    chol = torch.linalg.cholesky(kernel)
    values = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return values[0] if idx.dim() == 1 else values
