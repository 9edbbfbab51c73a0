"""How far each image's kept tokens are from all of its tokens: the per-sample OT distance that
records carry (issue #16; the paper's Fig. 2-4 rank and normalise it).

`OTPRUNE_DISTANCE` (read by `otprune.config.distance_kind`) chooses what is computed, for every
method that keeps a subset of an image's tokens (First-K ... OTPrune, and the in-LLM stage):

- `trace` (default): the paper's Eq. 4 on the features the selection saw (docs/ALGORITHM.md 8).
  Every dimension is divided by its root mean square over the N tokens (Z), the zero-mean
  Gaussians have second moments Sigma = Z^T Z / N and Sigma_A = Z_A^T Z_A / K, and
  `objective = Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2)` (Eq. 4, higher = closer). The recorded
  `distance` is the closed-form W2 between the two Gaussians, whose only subset-dependent part
  besides Tr(Sigma_A) is that trace:
  `distance = sqrt(Tr(Sigma) + Tr(Sigma_A) - 2 objective)` (lower = closer), the same number as
  `otprune.analysis.distances.gaussian_w2`.
- `w2`: `distance` is the exact empirical 2-Wasserstein distance between the uniform
  distributions on the N tokens and on the K kept ones (POT's network simplex; the `analysis`
  extra), on the raw features; `objective` is Eq. 4 as above. The exact solver is handed in by
  the caller (`exact=`): this core module stays pure torch.
- `off`: nothing is computed.

Cost: one (K, N) product `Z_A Z^T` (K N D multiply-adds) and a K x K `eigvalsh`, in float64 on
the features' device: the nonzero eigenvalues of Sigma^1/2 Sigma_A Sigma^1/2 are those of
`(Z_A Z^T)(Z_A Z^T)^T / (N K)` (eigenvalues within rounding of 0, up to K x eps x the largest,
count as 0: the rank is at most min(K, D)). Callers time it on its own clock, after the prefill's clock has
stopped, so it is never part of `select_ms` or `prefill_ms`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from otprune.timing import Clock

DISTANCE_KINDS = ("off", "trace", "w2")
DEFAULT_DISTANCE = "trace"  # < 5% of a LLaVA-1.5 prefill (README "Analyses"; `otprune bench distance`)

ExactW2 = Callable[[Tensor, Tensor], float]


def eq4_distance(features: Tensor, kept: Tensor) -> tuple[float, float]:
    """(Gaussian W2 distance, Eq. 4 objective) of one image.

    Args:
        features: (N, D) the tokens the selection saw (any float dtype; computed in float64).
        kept: (K,) distinct indices in [0, N) (any order).

    Returns:
        (sqrt(Tr Sigma + Tr Sigma_A - 2 T), T) with T = Tr((Sigma^1/2 Sigma_A Sigma^1/2)^1/2),
        as Python floats (module docstring). Keeping every token gives (0, Tr Sigma).
    """
    if features.dim() != 2 or 0 in features.shape:
        raise ValueError(f"features: must have shape (N, D) with N, D >= 1, got {tuple(features.shape)}")
    if kept.dim() != 1 or kept.numel() == 0:
        raise ValueError(f"kept: must have shape (K,) with K >= 1, got {tuple(kept.shape)}")
    z = rms_normalised(features.detach().to(torch.float64))  # (N, D)
    n = z.shape[0]
    za = z[kept.to(device=z.device, dtype=torch.long)]  # (K, D)
    k = za.shape[0]
    p = za @ z.mT  # (K, N)
    m = p @ p.mT / (n * k)  # (K, K): nonzero spectrum of Sigma^1/2 Sigma_A Sigma^1/2
    evals = torch.linalg.eigvalsh(0.5 * (m + m.mT).cpu())  # (K,) ascending; a small K x K problem: on the host
    # rank <= min(K, D): eigenvalues within rounding of 0 are 0 (their square roots would not be)
    noise = float(evals[-1].clamp_min(0.0)) * k * torch.finfo(torch.float64).eps
    objective = evals.masked_fill(evals <= noise, 0.0).sqrt().sum()
    value = z.square().sum() / n + za.square().sum() / k - 2.0 * objective
    return math.sqrt(max(float(value), 0.0)), float(objective)


def rms_normalised(x: Tensor) -> Tensor:
    """x: (N, D) with every dimension divided by its root mean square over the N tokens (Z of the
    module docstring); a constant-zero dimension stays 0."""
    return x / x.square().mean(0).sqrt().clamp_min(torch.finfo(x.dtype).tiny)


@dataclasses.dataclass(frozen=True)
class KeptDistances:
    """The distances of a batch of images: per image `distance` / `objective` (None where not
    defined), `kind` ("trace" / "w2"), and `ms`, the wall time of computing them."""

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
                         "which this model's glue was not given; use OTPRUNE_DISTANCE=trace")
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
        gauss, trace = eq4_distance(x, idx)
        objective.append(trace)
        distance.append(gauss if kind == "trace" else float(exact(x.detach().float().cpu(), idx.detach().cpu())))
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
