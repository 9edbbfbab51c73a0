"""Greedy log-determinant maximisation with incremental Cholesky updates.

Shared by OTPrune and DPP. Reference: L. Chen, G. Zhang, H. Zhou, "Fast Greedy MAP Inference
for Determinantal Point Process to Improve Recommendation Diversity", NeurIPS 2018.

For a PSD kernel L the gain of adding item i to the picked set A is
`log det L[A+i, A+i] - log det L[A, A] = log d2[i]`, where d2[i] is the squared diagonal of the
Cholesky factor that item i would get. After picking j, every d2[i] drops by e[i]^2 with
`e[i] = (L[j, i] - <c[j], c[i]>) / sqrt(d2[j])`, c[i] being i's Cholesky row so far.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from otprune.methods.base import row_gather


def greedy_logdet(
    diag: Tensor,
    kernel_row: Callable[[Tensor], Tensor],
    valid: Tensor,
    k_max: int,
    eps: float = 0.0,
) -> Tensor:
    """Greedy MAP of log det over a batch, K fixed steps, masked argmax, no host sync.

    Args:
        diag: (B, N) diagonal of the kernel L.
        kernel_row: maps picked indices j: (B,) to the kernel rows L[b, j[b], :]: (B, N).
        valid: (B, N) bool, candidates (padding is False).
        k_max: number of picks.
        eps: once no candidate of a sample has a gain d2 > eps (the kernel's rank is used up),
            that sample's remaining picks are its unpicked valid tokens in ascending index
            order; such picks do not update the factor.

    Returns:
        (B, k_max) long, picks in selection order (ties go to the lowest index).
    """
    bsz, n = diag.shape
    d2 = diag.clone()
    # chol[b, t, i]: entry t of token i's Cholesky row.
    chol = diag.new_zeros(bsz, max(k_max - 1, 0), n)
    picks = torch.empty(bsz, k_max, dtype=torch.long, device=diag.device)
    available = valid.clone()
    # Score used once the rank is exhausted: negative, highest for the lowest index.
    fallback = -1.0 - torch.arange(n, device=diag.device, dtype=diag.dtype) / n
    for t in range(k_max):
        score = torch.where(d2 > eps, d2, fallback).masked_fill(~available, float("-inf"))
        j = score.argmax(dim=1)  # (B,)
        picks[:, t] = j
        available = available.scatter(1, j[:, None], False)
        if t == k_max - 1:
            break
        dj = d2.gather(1, j[:, None])  # (B, 1)
        live = dj > eps
        row = kernel_row(j)  # (B, N)
        if t > 0:
            past = chol[:, :t, :]  # (B, t, N)
            cj = past.gather(2, j.view(-1, 1, 1).expand(-1, t, 1))  # (B, t, 1)
            row = row - torch.bmm(cj.mT, past).squeeze(1)
        e = row * torch.where(live, dj, torch.ones_like(dj)).rsqrt() * live
        chol[:, t, :] = e
        d2 = d2 - e * e
    return picks


def dense_rows(kernel: Tensor) -> Callable[[Tensor], Tensor]:
    """kernel_row for an explicit kernel: (B, N, N)."""
    return lambda j: row_gather(kernel, j)
