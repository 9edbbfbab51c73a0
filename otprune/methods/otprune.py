"""OTPrune: distribution-aligned visual token pruning via optimal transport.

Reference: "OTPrune: Distribution-Aligned Visual Token Pruning via Optimal Transport" (2026).
Pruning is cast as matching the kept tokens' distribution to the full set's under the
2-Wasserstein distance; the objective is relaxed to the monotone submodular
`log det(I + gamma * S S^T)[A, A]`, with S the token-token interaction of the
column-normalised features, and maximised greedily (1 - 1/e guarantee).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods._greedy import greedy_logdet
from otprune.methods.base import TokenSelector, row_gather, valid_mask


def normalise_columns(features: Tensor) -> Tensor:
    """features: (B, N, D) -> every dimension scaled to unit L2 norm over the N tokens.

    Padding rows must be zero: they then add nothing to the norms. An all-zero dimension
    stays zero instead of turning into NaN.
    """
    norms = torch.linalg.vector_norm(features, dim=1, keepdim=True)  # (B, 1, D)
    return features / norms.clamp_min(torch.finfo(features.dtype).tiny)


def interaction(xn: Tensor) -> Tensor:
    """S = Xn Xn^T: (B, N, N) from xn: (B, N, D). The cost floor of the method."""
    return torch.bmm(xn, xn.mT)


def kernel_diag(s: Tensor, gamma: float) -> Tensor:
    """diag(L) = 1 + gamma * ||S[i, :]||^2: (B, N)."""
    return 1.0 + gamma * (s * s).sum(-1)


@dataclasses.dataclass
class OTPrune(TokenSelector):
    """Greedy log-det selection on L = I + gamma * S S^T (ALGORITHM.md section 1).

    Steps per image: normalise each embedding dimension over the tokens to unit L2 norm;
    S = Xn Xn^T; L = I + gamma * S S^T; greedily add the token with the largest Cholesky
    residual d2 (the log-det gain is log d2). Since L - I is PSD, every d2 stays >= 1, so K is
    always reached with no fallback.

    The greedy reads diag(L) and the K picked rows of L only. S is symmetric, so row j of
    S S^T is S @ S[j]: the full N x N x N product is never formed.
    """

    gamma: float = 0.01
    name = "otprune"
    aliases = ("ours",)

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
            raise ValueError(f"OTPrune gamma={self.gamma!r}: must be a number > 0 (paper default 0.01)")

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        s = interaction(normalise_columns(features))  # (B, N, N), zero on padding
        n = s.shape[-1]
        eye = torch.eye(n, dtype=s.dtype, device=s.device)

        def kernel_row(j: Tensor) -> Tensor:  # L[b, j[b], :]: (B, N)
            s_j = row_gather(s, j)  # (B, N); S symmetric, so this is also column j
            return self.gamma * torch.bmm(s_j[:, None, :], s).squeeze(1) + eye[j]

        return greedy_logdet(kernel_diag(s, self.gamma), kernel_row, valid_mask(lengths, n), k_max)


def official_order(picks: list[int]) -> list[int]:
    """The order in which the official implementation hands kept tokens to the LLM.

    It collects the greedy picks in a Python `set` and iterates it, so tokens arrive in the
    set's hash-table order (e.g. 388, 389, 516, 383, ...), not in spatial order. Only for
    exact reproduction of the paper's runs (`OTPRUNE_ORDER=official`).
    """
    kept: set[int] = set()
    for index in picks:
        kept.add(int(index))
    return list(kept)
