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

from otprune.methods._numerics import one_thread


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
        k_max: number of picks (at most the valid tokens of every sample).
        eps: None for L = I + PSD (OTPrune): every d2 is >= 1 in exact arithmetic, so a
            candidate's d2 is read as max(d2, 1) (rounding, or a NaN, never pushes it below).
            Otherwise, once no unpicked token of a sample has d2 > eps (the kernel's rank is
            used up), that sample's remaining picks are its unpicked valid tokens in ascending
            index order, and they do not update the factor.

    A picked or padding token is never picked (again), whatever the arithmetic gives: the
    candidates are tracked apart from d2, and a candidate's score is never -inf or NaN.
    On the CPU the loop runs with one intra-op thread (`one_thread`): its ops are tiny.

    Returns:
        (B, k_max) long, the picks in selection order (ties go to the lowest index).
    """
    with one_thread(diag.device):
        return _greedy_logdet(diag, kernel_row, valid, k_max, eps)


def _greedy_logdet(diag: Tensor, kernel_row, valid: Tensor, k_max: int, eps: float | None) -> Tensor:
    bsz, n = diag.shape
    neg_inf = float("-inf")
    d2 = diag.masked_fill(~valid, neg_inf)  # (B, N); -inf marks padding and picked tokens
    d2_flat = d2.view(-1)
    if eps is None:
        floor = torch.zeros_like(d2).masked_fill_(~valid, neg_inf).add_(1.0)  # (B, N): 1, or -inf once taken
        floor_flat = floor.view(-1)
    else:
        taken = (~valid).view(-1)  # (B * N,) padding and picked tokens
        # Score once the rank is used up: negative and decreasing with the index.
        fallback = -1.0 - torch.arange(n, device=diag.device, dtype=diag.dtype) / n
    # chol[b, t, i]: entry t of token i's Cholesky row (step-major: each step writes one row).
    chol = diag.new_zeros(bsz, max(k_max - 1, 1), n)
    offsets = torch.arange(bsz, device=diag.device) * n  # (B,): flat index of each sample's row 0
    picks = []
    for t in range(k_max):
        if eps is None:
            # fmax: a NaN d2 reads as the floor; a taken token (d2 -inf or NaN) stays -inf.
            dj, j = torch.fmax(d2, floor).max(dim=1, keepdim=True)  # (B, 1) each, dj >= 1
            j = j.view(-1)
        else:
            score = torch.where(d2 > eps, d2, fallback).masked_fill_(taken.view(bsz, n), neg_inf)
            j = score.argmax(dim=1)  # (B,)
        picks.append(j)
        if t == k_max - 1:
            break
        flat = j if bsz == 1 else j + offsets  # (B,)
        if eps is None:
            floor_flat.index_fill_(0, flat, neg_inf)
            d2_flat.index_fill_(0, flat, neg_inf)
        else:
            dj = d2_flat.take(flat)[:, None]  # (B, 1)
            taken.index_fill_(0, flat, True)
        row = kernel_row(j, flat)  # (B, N) = L[b, j[b], :]
        if t > 0:
            c_j = chol[:, :t].gather(2, j.view(bsz, 1, 1).expand(bsz, t, 1))  # (B, t, 1): picked token's row
            row = torch.baddbmm(row[:, None, :], c_j.transpose(1, 2), chol[:, :t], alpha=-1.0).view(bsz, n)
        if eps is None:
            scale = dj.rsqrt()
        else:
            live = dj > eps  # False for a NaN
            scale = torch.where(live, dj, 1.0).rsqrt() * live
        e = row * scale  # (B, N)
        chol[:, t] = e  # entry t of every token's row
        d2.addcmul_(e, e, value=-1.0)
    return torch.stack(picks, dim=1)
