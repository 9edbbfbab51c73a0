"""DPP: greedy MAP inference of a determinantal point process on the cosine-similarity kernel.

References: A. Kulesza, B. Taskar, "Determinantal Point Processes for Machine Learning" (2012);
L. Chen et al., "Fast Greedy MAP Inference for Determinantal Point Process to Improve
Recommendation Diversity", NeurIPS 2018. Used as a baseline in the OTPrune paper (Sec. 5).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from otprune.methods._greedy import greedy_logdet
from otprune.methods.base import TokenSelector, mask_beyond_k, valid_mask
from otprune.methods.divprune import cosine_similarity


@dataclasses.dataclass
class DPP(TokenSelector):
    """Greedy maximisation of log det(C[A, A]), C[i, j] = cos(x_i, x_j).

    C has rank at most D (and a zero token has a zero row). Once no unpicked token has a
    Cholesky residual d2 > eps, the kernel's rank is used up: the remaining slots are filled
    with the unpicked tokens in ascending index order (deterministic, documented fallback).
    """

    eps: float = 1e-6
    name = "dpp"
    display_name = "DPP"
    table_rank = 80

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ValueError(f"DPP eps={self.eps!r}: must be a number >= 0")

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        kernel = cosine_similarity(features)  # (B, N, N)
        valid = valid_mask(lengths, kernel.shape[-1])
        return mask_beyond_k(greedy_logdet(kernel, valid, k_max, eps=self.eps), k)
