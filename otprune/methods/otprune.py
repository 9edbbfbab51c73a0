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
from otprune.methods.base import TokenSelector, flat_rows, valid_mask


def normalise_columns(features: Tensor) -> Tensor:
    """features: (B, N, D) -> every dimension scaled to unit L2 norm over the N tokens.

    Padding rows must be zero: they then add nothing to the norms. An all-zero dimension
    stays zero instead of turning into NaN.
    """
    ones = features.new_ones(features.shape[0], 1, features.shape[1])
    sq_norms = torch.bmm(ones, features * features)  # (B, 1, D); a reduction over N, as a GEMV
    return features * sq_norms.clamp_min(torch.finfo(features.dtype).tiny).rsqrt()


def symmetric_gram(x: Tensor, blocks: int = 4) -> Tensor:
    """x: (B, N, D) -> x x^T: (B, N, N), computing only the block lower triangle.

    The lower blocks cost (blocks + 1) / (2 * blocks) of one full product; the upper triangle
    is mirrored from them, so the result is exactly symmetric.
    """
    bsz, n, _ = x.shape
    blocks = max(1, min(blocks, n // 128))
    if blocks == 1:
        return torch.bmm(x, x.transpose(1, 2))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    gram = x.new_empty(bsz, n, n)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        column = torch.bmm(x[:, lo:], x[:, lo:hi].transpose(1, 2))  # (B, N - lo, hi - lo): rows lo.., cols lo:hi
        gram[:, lo:, lo:hi] = column
        gram[:, lo:hi, hi:] = column[:, hi - lo :].transpose(1, 2)
    return gram


def interaction(xn: Tensor) -> Tensor:
    """S = Xn Xn^T: (B, N, N) from xn: (B, N, D). The cost floor of the method."""
    return symmetric_gram(xn)


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

    Both S and S S^T = S^2 are symmetric, so each is formed from its block lower triangle
    (`symmetric_gram`); the greedy then reads diag(L) and K rows of L.
    """

    gamma: float = 0.01
    name = "otprune"
    aliases = ("ours",)

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
            raise ValueError(f"OTPrune gamma={self.gamma!r}: must be a number > 0 (paper default 0.01)")

    def kernel(self, features: Tensor) -> Tensor:
        """L = I + gamma * S S^T: (B, N, N) from features: (B, N, D) (padding rows zero)."""
        kernel = symmetric_gram(interaction(normalise_columns(features)))
        kernel.mul_(self.gamma).diagonal(dim1=1, dim2=2).add_(1.0)
        return kernel

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        kernel = self.kernel(features)  # (B, N, N)
        diag = kernel.diagonal(dim1=1, dim2=2)
        valid = valid_mask(lengths, kernel.shape[-1])
        return greedy_logdet(diag, flat_rows(kernel), valid, k_max)


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
