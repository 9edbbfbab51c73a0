"""Greedy log-determinant maximisation with incremental Cholesky updates.

Shared by OTPrune and DPP. Reference: L. Chen, G. Zhang, H. Zhou, "Fast Greedy MAP Inference
for Determinantal Point Process to Improve Recommendation Diversity", NeurIPS 2018.

For a PSD kernel L the gain of adding item i to the picked set A is
`log det L[A+i, A+i] - log det L[A, A] = log d2[i]`, where d2[i] is the squared diagonal entry
that item i would get in the Cholesky factor of L[A+i, A+i]. After picking j, every d2[i] drops
by e[i]^2 with `e[i] = (L[j, i] - <c[j], c[i]>) / sqrt(d2[j])`, c[i] being i's Cholesky row.
Picking by max d2 is picking by max gain, since log is increasing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def greedy_logdet(
    diag: Tensor,
    kernel_row: Callable[[Tensor], Tensor],
    valid: Tensor,
    k_max: int,
    eps: float | None = None,
) -> Tensor:
    """Greedy MAP of log det over a batch: k_max fixed steps of masked argmax, no host sync.

    Args:
        diag: (B, N) diagonal of the kernel L.
        kernel_row: (j, flat) -> the kernel rows L[b, j[b], :]: (B, N), given the picked indices
            j: (B,) and their flat positions flat = b * N + j[b] (for an index_select on a
            (B * N, N) view).
        valid: (B, N) bool, the candidates (padding is False).
        k_max: number of picks.
        eps: None when every gain is known to stay positive (L = I + PSD, as in OTPrune).
            Otherwise, once no unpicked token of a sample has d2 > eps (the kernel's rank is
            used up), that sample's remaining picks are its unpicked valid tokens in ascending
            index order, and they do not update the factor.

    Returns:
        (B, k_max) long, the picks in selection order (ties go to the lowest index).
    """
    bsz, n = diag.shape
    neg_inf = float("-inf")
    d2 = diag.masked_fill(~valid, neg_inf)  # (B, N); -inf marks padding and picked tokens
    d2_flat = d2.view(-1)
    if eps is not None:
        # Score once the rank is used up: negative and decreasing with the index.
        fallback = -1.0 - torch.arange(n, device=diag.device, dtype=diag.dtype) / n
    # chol[b, i, t]: entry t of token i's Cholesky row; flat view for row gathers.
    chol = diag.new_zeros(bsz, n, max(k_max - 1, 1))
    chol_flat = chol.view(bsz * n, -1)
    offsets = torch.arange(bsz, device=diag.device) * n  # (B,): flat index of each sample's row 0
    picks = []
    for t in range(k_max):
        if eps is None:
            dj, j = d2.max(dim=1, keepdim=True)  # (B, 1) each: the largest gain and its token
            j = j.view(-1)
        else:
            score = torch.where(d2 > eps, d2, fallback).masked_fill_(d2 == neg_inf, neg_inf)
            j = score.argmax(dim=1)  # (B,)
        picks.append(j)
        if t == k_max - 1:
            break
        flat = j if bsz == 1 else j + offsets  # (B,)
        if eps is not None:
            dj = d2_flat.take(flat)[:, None]  # (B, 1)
        d2_flat.index_fill_(0, flat, neg_inf)
        row = kernel_row(j, flat)  # (B, N) = L[b, j[b], :]
        if t > 0:
            c_j = chol_flat.index_select(0, flat)[:, :t, None]  # (B, t, 1)
            row = torch.baddbmm(row[:, :, None], chol[:, :, :t], c_j, alpha=-1.0).view(bsz, n)
        if eps is None:
            scale = dj.rsqrt()
        else:
            live = dj > eps
            scale = torch.where(live, dj, 1.0).rsqrt() * live
        e = row * scale  # (B, N)
        chol[:, :, t] = e
        d2.addcmul_(e, e, value=-1.0)
    return torch.stack(picks, dim=1)
