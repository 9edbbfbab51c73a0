"""How far each image's kept tokens are from all of its tokens: the per-sample OT distance that
records carry (issue #16; the paper's Fig. 2-4 rank and normalise it; issue #23: which distance).

Moments (the paper's Sec. 3, docs/ALGORITHM.md 9): every dimension is divided by its root mean
square over the N tokens (Z); the zero-mean Gaussians have second moments Sigma = Z^T Z / N and
Sigma_A = Z_A^T Z_A / K, and Eq. 4's objective is `f = Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2)`
(higher = closer). The normalisation fixes Tr(Sigma) (= D, less the all-zero dimensions), and the
paper takes Tr(Sigma_A) as fixed at the same value (the value every uniformly random subset has
on average), so W2^2 = Tr(Sigma) + Tr(Sigma_A) - 2 f and "minimise W2" becomes "maximise f".

`OTPRUNE_DISTANCE` (read by `otprune.config.distance_kind`) chooses the recorded `distance`, for
every method that keeps a subset of an image's tokens (First-K ... OTPrune, and the in-LLM stage);
`objective` is f in every mode but `off`:

- `eq4` (default): the paper's distance, `paper_distance(f, Tr Sigma)`: W2 with both traces at
  the value the normalisation fixes, `sqrt(2 (Tr Sigma - f))`. A strictly decreasing function
  of f for a fixed image, so it ranks subsets exactly as Eq. 4 does. A subset may have
  f > Tr Sigma (its own trace is not fixed: a few high-energy tokens); its distance is then the
  negative root -sqrt(2 (f - Tr Sigma)), so the order stays f's (a clamp at 0 would tie them).
- `gaussian`: the closed-form W2 between the two zero-mean Gaussian fits with the subset's ACTUAL
  trace, `sqrt(Tr Sigma + Tr Sigma_A - 2 f)` (`otprune.analysis.distances.gaussian_w2`). Not the
  paper's: a subset of high-energy tokens (what OTPrune keeps) has a large Tr Sigma_A and looks
  far though its f is the best.
- `w2`: the exact empirical 2-Wasserstein distance between the uniform distributions on the N
  tokens and on the K kept ones (POT's network simplex; the `analysis` extra), on the raw
  features. The exact solver is handed in by the caller (`exact=`): this core module stays pure
  torch.
- `off`: nothing is computed.

Numerics (issue #23 point 2): the nonzero eigenvalues of Sigma^1/2 Sigma_A Sigma^1/2 are the
squared singular values of `P = Z_A Z^T / sqrt(N K)` (K x N), so f is P's nuclear norm: one K x N
product and one `svdvals`, in float64, with no square root of a rounded eigenvalue (forming P P^T
would square the condition number and drown the small genuine eigenvalues of low-rank,
non-zero-mean inputs). Singular values up to K x eps x the largest are rounding and count as 0:
a direct `scipy.linalg.sqrtm` reference resolves eigenvalues only down to about eps x the largest
(singular values down to sqrt(eps) x), so the cut keeps every one it keeps. Callers time it on its
own clock, after the prefill's clock has stopped, so it is never part of `select_ms` or `prefill_ms`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from otprune.timing import Clock

DISTANCE_KINDS = ("off", "eq4", "gaussian", "w2")
DEFAULT_DISTANCE = "eq4"  # < 5% of a LLaVA-1.5 prefill (README "Analyses"; `otprune bench distance`)
RENAMED = {"trace": "before issue #23 'trace' recorded the actual-trace Gaussian W2 (now 'gaussian'); "
                    "the paper's distance is 'eq4' (default)"}
KIND_LABELS = {
    "eq4": "the paper's W2 (Eq. 4 with the traces the normalisation fixes; ranks as Eq. 4's f)",
    "gaussian": "Gaussian W2 with the subset's actual trace (not the paper's)",
    "w2": "exact empirical W2 (POT)",
    "trace": "Gaussian W2 with the subset's actual trace (records written before issue #23; not the paper's)",
}

ExactW2 = Callable[[Tensor, Tensor], float]


@dataclasses.dataclass(frozen=True)
class Eq4Terms:
    """The Eq. 4 quantities of one image (float64 Python floats): `objective` f, `trace_full`
    Tr(Sigma), `trace_kept` Tr(Sigma_A)."""

    objective: float
    trace_full: float
    trace_kept: float

    @property
    def paper(self) -> float:
        """The paper's distance (`paper_distance`)."""
        return paper_distance(self.objective, self.trace_full)

    @property
    def gaussian(self) -> float:
        """The actual-trace Gaussian W2, sqrt(Tr Sigma + Tr Sigma_A - 2 f)."""
        return math.sqrt(max(self.trace_full + self.trace_kept - 2.0 * self.objective, 0.0))


def paper_distance(objective: float, trace_full: float) -> float:
    """The paper's W2 from Eq. 4's f and Tr(Sigma), both traces at the value the normalisation
    fixes: sqrt(2 (Tr Sigma - f)), the negative root -sqrt(2 (f - Tr Sigma)) when f > Tr Sigma
    (module docstring); strictly decreasing in f."""
    value = 2.0 * (trace_full - objective)
    return math.copysign(math.sqrt(abs(value)), value)


def cross_root_trace(z: Tensor, za: Tensor) -> Tensor:
    """Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2) for Sigma = z^T z / N, Sigma_A = za^T za / K:
    the nuclear norm of za z^T / sqrt(N K) (module docstring), float64.

    z: (N, D); za: (K, D) -> 0-dim, or (B, K, D) -> (B,): any rows (the kept rows of z, or
    centred ones)."""
    n, k = z.shape[0], za.shape[-2]
    p = za @ z.mT  # (..., K, N)
    sv = torch.linalg.svdvals(p.cpu())  # (..., min(K, N)): a small problem, on the host
    cut = sv.amax(-1, keepdim=True) * sv.shape[-1] * torch.finfo(torch.float64).eps
    return sv.masked_fill(sv <= cut, 0.0).sum(-1) / math.sqrt(n * k)


def eq4_terms(features: Tensor, kept: Tensor) -> Eq4Terms:
    """The Eq. 4 quantities of one image.

    Args:
        features: (N, D) the tokens the selection saw (any float dtype; computed in float64).
        kept: (K,) distinct indices in [0, N) (any order).
    """
    if features.dim() != 2 or 0 in features.shape:
        raise ValueError(f"features: must have shape (N, D) with N, D >= 1, got {tuple(features.shape)}")
    if kept.dim() != 1 or kept.numel() == 0:
        raise ValueError(f"kept: must have shape (K,) with K >= 1, got {tuple(kept.shape)}")
    x = features.detach().to(torch.float64)
    scale = rms(x)  # (D,)
    z = x / scale.clamp_min(torch.finfo(x.dtype).tiny)  # (N, D): Z, as `rms_normalised`
    za = z[kept.to(device=z.device, dtype=torch.long)]  # (K, D)
    objective = cross_root_trace(z, za)
    # Tr Sigma: every non-zero dimension has unit second moment, so it is their count
    return Eq4Terms(float(objective), float((scale > 0).sum()), float(za.square().sum() / za.shape[0]))


def eq4_distance(features: Tensor, kept: Tensor) -> tuple[float, float]:
    """(the paper's distance, Eq. 4's f) of one image (`eq4_terms`; the `eq4` kind). Keeping
    every token gives (0, Tr Sigma)."""
    terms = eq4_terms(features, kept)
    return terms.paper, terms.objective


def rms(x: Tensor) -> Tensor:
    """(D,): the root mean square of every dimension of x: (N, D) over the N tokens."""
    return x.square().mean(0).sqrt()


def rms_normalised(x: Tensor) -> Tensor:
    """x: (N, D) with every dimension divided by its root mean square over the N tokens (Z of the
    module docstring); a constant-zero dimension stays 0."""
    return x / rms(x).clamp_min(torch.finfo(x.dtype).tiny)


@dataclasses.dataclass(frozen=True)
class KeptDistances:
    """The distances of a batch of images: per image `distance` / `objective` (None where not
    defined), `kind` (one of DISTANCE_KINDS but "off"), and `ms`, the wall time of computing them."""

    kind: str
    distance: list[float | None]
    objective: list[float | None]
    ms: float


def kept_distances(kind: str, features: Sequence[Tensor | None], kept: Sequence[Tensor | None],
                   exact: ExactW2 | None = None) -> KeptDistances | None:
    """The distance of every image of a batch on its own clock (None for kind "off").

    Args:
        kind: one of DISTANCE_KINDS.
        features: per image, (N_i, D) the tokens its selection saw, or None where no subset was
            kept (merged tokens, VTW): its entries are None.
        kept: per image, (K_i,) the kept indices (K_i = 0: entries None).
        exact: for kind "w2", the exact solver (features, kept) -> W2, e.g.
            `otprune.analysis.distances.wasserstein2`.
    """
    if kind not in DISTANCE_KINDS:
        raise ValueError(f"distance kind {kind!r}: must be one of {', '.join(DISTANCE_KINDS)}")
    if kind == "off":
        return None
    if kind == "w2" and exact is None:
        raise ValueError("OTPRUNE_DISTANCE='w2': needs the exact solver (POT, `pip install 'otprune[analysis]'`), "
                         "which this model's glue was not given; use OTPRUNE_DISTANCE=eq4")
    if len(features) != len(kept):
        raise ValueError(f"features and kept: one entry per image each, got {len(features)} and {len(kept)}")
    device = next((f.device for f in features if f is not None), torch.device("cpu"))
    clock = Clock(device)
    distance, objective = [], []
    for x, idx in zip(features, kept, strict=True):
        if x is None or idx is None or idx.numel() == 0:
            distance.append(None)
            objective.append(None)
            continue
        terms = eq4_terms(x, idx)
        objective.append(terms.objective)
        if kind == "w2":
            distance.append(float(exact(x.detach().float().cpu(), idx.detach().cpu())))
        else:
            distance.append(terms.paper if kind == "eq4" else terms.gaussian)
    return KeptDistances(kind, distance, objective, clock.stop().ms())


def attach(stats: Sequence, image_index: Sequence[Sequence[int]], found: KeptDistances | None) -> None:
    """Write `found` (batch-wide, per image) into each sample's `SampleStats` (its own images)."""
    if found is None:
        return
    for sample, images in zip(stats, image_index, strict=True):
        sample.distance_kind = found.kind
        sample.distance = [found.distance[i] for i in images]
        sample.objective = [found.objective[i] for i in images]
        sample.distance_ms = found.ms
