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


def column_sq_norms(features: Tensor, chunk: int = 64) -> Tensor:
    """features: (B, N, D) -> (B, 1, D), the squared L2 norm of every dimension over the tokens.

    Summed chunk by chunk of tokens as small GEMVs through one reused buffer, so no
    (B, N, D) temporary is allocated.
    """
    bsz, n, dim = features.shape
    chunk = min(chunk, n)
    acc = features.new_zeros(bsz, 1, dim)
    ones = features.new_ones(bsz, 1, chunk)
    buf = features.new_empty(bsz, chunk, dim)
    for lo in range(0, n, chunk):
        part = features[:, lo : lo + chunk]
        rows = part.shape[1]
        acc.baddbmm_(ones[:, :, :rows], torch.mul(part, part, out=buf[:, :rows]))
    return acc


def column_scales(features: Tensor) -> Tensor:
    """(B, 1, D): 1 / ||X[:, c]||^2 per dimension c; 0 for an all-zero dimension (no NaN)."""
    sq = column_sq_norms(features)
    return torch.where(sq > 0, sq.reciprocal(), torch.zeros_like(sq))


def normalise_columns(features: Tensor) -> Tensor:
    """features: (B, N, D) -> every dimension scaled to unit L2 norm over the N tokens.

    Padding rows must be zero: they then add nothing to the norms. An all-zero dimension
    stays zero instead of turning into NaN.
    """
    return features * column_scales(features).sqrt()


def symmetric_gram(x: Tensor, blocks: int = 4, scale: Tensor | None = None) -> Tensor:
    """x: (B, N, D) -> x diag(scale) x^T: (B, N, N), computing only the block lower triangle.

    Row block [lo:hi] gets columns [0:hi] from one GEMM written straight into the result;
    the blocks cost (blocks + 1) / (2 * blocks) of one full product, and the upper triangle
    is mirrored from them, so the result is exactly symmetric. `scale`: (B, 1, D) weights,
    applied to each row block through one reused buffer (no scaled copy of the whole x).
    """
    bsz, n, dim = x.shape
    blocks = max(1, min(blocks, n // 128))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    gram = x.new_empty(bsz, n, n)
    buf = None if scale is None else x.new_empty(bsz, max(b - a for a, b in zip(edges[:-1], edges[1:], strict=True)), dim)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        left = x[:, lo:hi] if buf is None else torch.mul(x[:, lo:hi], scale, out=buf[:, : hi - lo])
        torch.bmm(left, x[:, :hi].transpose(1, 2), out=gram[:, lo:hi, :hi])  # (B, hi - lo, hi)
        if lo > 0:
            gram[:, :lo, lo:hi] = gram[:, lo:hi, :lo].transpose(1, 2)
    return gram


def interaction(features: Tensor) -> Tensor:
    """S = Xn Xn^T: (B, N, N), Xn the column-normalised features: (B, N, D) (padding rows zero).

    Xn is never formed: S = X diag(1 / ||X[:, c]||^2) X^T. This product is the method's cost
    floor; exploiting the symmetry of S costs about 0.6-0.7 of one full product.
    """
    return symmetric_gram(features, scale=column_scales(features))


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
        kernel = symmetric_gram(interaction(features))
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
