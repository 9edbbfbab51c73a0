"""DivPrune: diversity-based visual token pruning as a max-min diversity problem.

Reference: S. R. Alvar, G. Singh, M. Akbari, Y. Zhang, "DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models", CVPR 2025.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods._numerics import max_abs, one_thread, pow2_scale
from otprune.methods.base import TokenSelector, flat_rows, mask_beyond_k, valid_mask


def cosine_similarity(features: Tensor) -> Tensor:
    """features: (B, N, D) -> (B, N, N) cosine similarities.

    The diagonal is exactly 1 (cos(x, x)), or 0 for an all-zero token, whose row is zero.
    Each token is first scaled by an exact power of two (`otprune.methods._numerics`), so its
    norm neither overflows nor underflows at any magnitude: x and c * x give the same kernel.
    """
    features = features * pow2_scale(max_abs(features, dim=-1))  # (B, N, D), largest |value| in [0.5, 1)
    norms = torch.linalg.vector_norm(features, dim=-1, keepdim=True)  # (B, N, 1)
    unit = features / norms.clamp_min(torch.finfo(features.dtype).tiny)
    cos = torch.bmm(unit, unit.transpose(1, 2))
    cos.diagonal(dim1=1, dim2=2).copy_((norms.squeeze(-1) > 0).to(cos.dtype))
    return cos


@dataclasses.dataclass
class DivPrune(TokenSelector):
    """Max-min cosine-distance selection (docs/ALGORITHM.md section 5).

    Distance d(i, j) = 1 - cos(x_i, x_j). First pick: the token whose nearest other token is
    farthest. Then repeatedly the unpicked token whose minimum distance to the picked set is
    largest. Ties go to the lowest index.
    """

    name = "divprune"
    display_name = "DivPrune"
    table_rank = 90

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        dist = 1.0 - cosine_similarity(features)  # (B, N, N)
        with one_thread(dist.device):  # a loop of tiny ops (see `one_thread`)
            return mask_beyond_k(self._greedy(dist, lengths, k_max), k)

    def _greedy(self, dist: Tensor, lengths: Tensor, k_max: int) -> Tensor:
        bsz, n, _ = dist.shape
        valid = valid_mask(lengths, n)
        eye = torch.eye(n, dtype=torch.bool, device=dist.device)
        others = dist.masked_fill(eye | ~valid[:, None, :], float("inf"))
        score = others.amin(dim=-1).masked_fill_(~valid, float("-inf"))  # (B, N); +inf for a lone token
        offsets = torch.arange(bsz, device=dist.device) * n
        dist_rows = flat_rows(dist)
        picks = []
        for t in range(k_max):
            j = score.argmax(dim=1)  # (B,)
            picks.append(j)
            if t == k_max - 1:
                break
            flat = j + offsets
            row = dist_rows(j, flat)  # (B, N): distances to the new pick
            # score[i] = min distance from i to the picked set; -inf for picked and padding.
            score = row.masked_fill(~valid, float("-inf")) if t == 0 else torch.minimum(score, row)
            score.view(-1).index_fill_(0, flat, float("-inf"))
        return torch.stack(picks, dim=1)
