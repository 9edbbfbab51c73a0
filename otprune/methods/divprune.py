"""DivPrune: diversity-based visual token pruning as a max-min diversity problem.

Reference: S. R. Alvar, G. Singh, M. Akbari, Y. Zhang, "DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models", CVPR 2025.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.base import TokenSelector, row_gather, valid_mask


def cosine_similarity(features: Tensor) -> Tensor:
    """features: (B, N, D) -> (B, N, N) cosine similarities; a zero row gives zeros."""
    norms = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    unit = features / norms.clamp_min(torch.finfo(features.dtype).tiny)
    return torch.bmm(unit, unit.mT)


@dataclasses.dataclass
class DivPrune(TokenSelector):
    """Max-min cosine-distance selection (ALGORITHM.md section 5).

    Distance d(i, j) = 1 - cos(x_i, x_j). First pick: the token whose nearest other token is
    farthest. Then repeatedly the unpicked token whose minimum distance to the picked set is
    largest. Ties go to the lowest index.
    """

    name = "divprune"

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        dist = 1.0 - cosine_similarity(features)  # (B, N, N)
        bsz, n, _ = dist.shape
        valid = valid_mask(lengths, n)
        inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
        eye = torch.eye(n, dtype=torch.bool, device=dist.device)
        others = dist.masked_fill(eye | ~valid[:, None, :], inf)
        nearest = others.amin(dim=-1)  # (B, N); +inf for a lone token
        picks = torch.empty(bsz, k_max, dtype=torch.long, device=dist.device)
        available = valid
        score = nearest
        for t in range(k_max):
            j = score.masked_fill(~available, float("-inf")).argmax(dim=1)
            picks[:, t] = j
            available = available.scatter(1, j[:, None], False)
            row = row_gather(dist, j)
            score = row if t == 0 else torch.minimum(score, row)
        return picks
