"""Greedy log-determinant maximisation with incremental Cholesky updates.

Shared by OTPrune and DPP. Reference: L. Chen, G. Zhang, H. Zhou, "Fast Greedy MAP Inference
for Determinantal Point Process to Improve Recommendation Diversity", NeurIPS 2018.

For a PSD kernel L the gain of adding item i to the picked set A is
`log det L[A+i, A+i] - log det L[A, A] = log d2[i]`, where d2[i] is the squared diagonal entry
that item i would get in the Cholesky factor of L[A+i, A+i]. After picking j, every d2[i] drops
by e[i]^2 with `e[i] = (L[j, i] - <c[j], c[i]>) / sqrt(d2[j])`, c[i] being i's Cholesky row.
Picking by max d2 is picking by max gain, since log is increasing.

Two loops compute the same picks:
- `greedy_host`, on the CPU: one sample at a time, the picked index read as a Python int (there
  is no device to synchronise with) and every step done on NumPy views of the tensors' memory.
  A step is a handful of operations on N floats, where NumPy's per-call cost (~1 us) is a small
  fraction of PyTorch's (~5-10 us, plus PyTorch's intra-op thread barrier on a busy CPU). It
  reads the kernel row by row, so a kernel given by a factor (L = I + F F^T) need never be
  formed: `greedy_logdet_gram` computes the K rows it reads as K products F F[j].
- `greedy_batched`, elsewhere (GPU, or traced by `torch.compile`): a padded batch in k_max
  fixed steps of masked argmax, with no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from otprune.methods._numerics import one_thread

HOST_DTYPES = (torch.float32, torch.float64)


def greedy_logdet(kernel: Tensor, valid: Tensor, k_max: int, eps: float | None = None) -> Tensor:
    """Greedy MAP of log det over a batch of kernels.

    Args:
        kernel: (B, N, N) the symmetric PSD kernels L (rows past a sample's tokens are ignored).
        valid: (B, N) bool, the candidates (padding is False).
        k_max: number of picks (at most the valid tokens of every sample).
        eps: None for L = I + PSD (OTPrune): every d2 is >= 1 in exact arithmetic, so a
            candidate's d2 is read as max(d2, 1) (rounding, or a NaN, never pushes it below).
            Otherwise, once no unpicked token of a sample has d2 > eps (the kernel's rank is
            used up), that sample's remaining picks are its unpicked valid tokens in ascending
            index order, and they do not update the factor.

    A picked or padding token is never picked (again), whatever the arithmetic gives: the
    candidates are tracked apart from d2, and a candidate's score is never -inf or NaN.

    Returns:
        (B, k_max) long, the picks in selection order (ties go to the lowest index).
    """
    if on_host(kernel):
        picks = []
        for b in range(kernel.shape[0]):
            rows = kernel[b].numpy()
            picks.append(greedy_host(np.diagonal(rows), rows.__getitem__, valid[b].numpy(), k_max, eps))
        return torch.from_numpy(np.stack(picks))
    with one_thread(kernel.device):  # traced, or a CPU kernel of another dtype: tiny ops, one thread
        return greedy_batched(kernel, valid, k_max, eps)


def on_host(tensor: Tensor) -> bool:
    """Whether `greedy_host` runs on this tensor's memory (a CPU tensor of fp32/fp64, not traced)."""
    return tensor.device.type == "cpu" and tensor.dtype in HOST_DTYPES and not torch.compiler.is_compiling()


def greedy_logdet_gram(
    factor: Tensor, valid: Tensor, k_max: int, copies: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """`greedy_logdet` of L = I + F F^T for factor F: (B, N, M) on the host (`on_host`), never
    forming L: its diagonal is 1 + ||F[i]||^2 and the row of a pick j is e_j + F F[j] (one
    matrix-vector product per pick: K N M work instead of the N^2 M of F F^T).

    `copies`: (rep, sign), each (B, N): the lowest exact copy (or negation) of each token and its
    sign, +-1 (`otprune.methods.otprune.representatives`), or None when no token has one. L is
    then read through them, L[i, j] = [i == j] + sign[i] sign[j] G[rep[i], rep[j]], so copies get
    bit-identical kernel values, and negations exactly negated ones, whatever the BLAS's summation
    order (which may depend on where a row sits in memory): an exact tie goes to the lowest index.
    """
    picks = []
    for b in range(factor.shape[0]):
        f = factor[b].numpy()  # (N, M)
        diag = np.einsum("ij,ij->i", f, f)
        rep_b = None if copies is None else copies[0][b].numpy()
        sign_b = None if copies is None else copies[1][b].numpy()
        if rep_b is not None:
            diag = diag[rep_b]
        diag += 1.0
        vec = np.empty(f.shape[1], dtype=f.dtype)
        row = np.empty(f.shape[0], dtype=f.dtype)
        mapped = np.empty_like(row)

        def kernel_row(j: int, f=f, vec=vec, row=row, mapped=mapped, rep_b=rep_b, sign_b=sign_b) -> np.ndarray:
            np.copyto(vec, f[j if rep_b is None else rep_b[j]])
            np.matmul(f, vec, out=row)
            if rep_b is not None:
                row = np.take(row, rep_b, out=mapped)
                row *= sign_b  # exact: +-1
                if sign_b[j] < 0:
                    np.negative(row, out=row)
            row[j] += 1.0
            return row

        picks.append(greedy_host(diag, kernel_row, valid[b].numpy(), k_max))
    return torch.from_numpy(np.stack(picks))


def greedy_host(
    diag: np.ndarray, kernel_row: Callable[[int], np.ndarray], valid: np.ndarray, k: int, eps: float | None = None
) -> np.ndarray:
    """One sample's greedy on the host -> (k,) int64 picks.

    Args:
        diag: (N,) the kernel's diagonal.
        kernel_row: j -> the kernel's row j, (N,) (read before the next call).
        valid: (N,) bool, the candidates.

    The same rule, tie-break and guards as `greedy_batched` (see `greedy_logdet`); floating-point
    warnings of a broken kernel (NaN, inf) are silenced, the guards handle them.
    """
    n = diag.shape[0]
    dtype = diag.dtype.type
    d2 = diag.copy()  # (N,)
    d2[~valid] = -np.inf  # -inf marks padding and picked tokens
    floor = np.where(valid, dtype(1.0), dtype(-np.inf))  # (N,): 1, or -inf once taken (eps None)
    score = np.empty_like(d2)
    chol = np.zeros((max(k - 1, 1), n), dtype=diag.dtype)  # chol[t, i]: entry t of token i's Cholesky row
    dot = np.empty_like(d2)
    picks = np.empty(k, dtype=np.int64)
    with np.errstate(all="ignore"):
        for t in range(k):
            if eps is None:
                np.fmax(d2, floor, out=score)  # a NaN d2 reads as the floor; a taken token stays -inf
                j = int(score.argmax())
                dj = score[j]  # >= 1
            else:
                np.copyto(score, d2)
                score[~(d2 > eps)] = -np.inf  # also NaN
                j = int(score.argmax())
                dj = score[j]
                if not dj > eps:  # rank used up: the unpicked candidates, ascending
                    untaken = valid.copy()
                    untaken[picks[:t]] = False
                    rest = np.flatnonzero(untaken)[: k - t]  # fewer than k - t when k exceeds the candidates
                    picks[t : t + rest.size] = rest
                    picks[t + rest.size :] = -1
                    return picks
            picks[t] = j
            if t == k - 1:
                break
            e = chol[t]
            if t == 0:
                np.copyto(e, kernel_row(j))
            else:
                np.matmul(chol[:t, j], chol[:t], out=dot)  # <c[j], c[i]> for every i
                np.subtract(kernel_row(j), dot, out=e)
            e *= dtype(1.0) / np.sqrt(dj)
            np.multiply(e, e, out=dot)
            d2 -= dot
            d2[j] = -np.inf
            floor[j] = -np.inf
    return picks


def greedy_batched(kernel: Tensor, valid: Tensor, k_max: int, eps: float | None = None) -> Tensor:
    """`greedy_logdet` over a padded batch: k_max fixed steps of masked argmax, no host sync."""
    bsz, n, _ = kernel.shape
    rows = kernel.reshape(bsz * n, n)  # (B * N, N)
    neg_inf = float("-inf")
    d2 = kernel.diagonal(dim1=1, dim2=2).masked_fill(~valid, neg_inf)  # (B, N); -inf marks padding and picked tokens
    d2_flat = d2.view(-1)
    if eps is None:
        floor = torch.zeros_like(d2).masked_fill_(~valid, neg_inf).add_(1.0)  # (B, N): 1, or -inf once taken
        floor_flat = floor.view(-1)
    else:
        taken = (~valid).view(-1)  # (B * N,) padding and picked tokens
        # Score once the rank is used up: negative and decreasing with the index.
        fallback = -1.0 - torch.arange(n, device=kernel.device, dtype=kernel.dtype) / n
    # chol[b, t, i]: entry t of token i's Cholesky row (step-major: each step writes one row).
    chol = kernel.new_zeros(bsz, max(k_max - 1, 1), n)
    offsets = torch.arange(bsz, device=kernel.device) * n  # (B,): flat index of each sample's row 0
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
        flat = j + offsets  # (B,)
        if eps is None:
            floor_flat.index_fill_(0, flat, neg_inf)
        else:
            dj = d2_flat.take(flat)[:, None]  # (B, 1)
            taken.index_fill_(0, flat, True)
        row = rows.index_select(0, flat)  # (B, N) = L[b, j[b], :]
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
        d2_flat.index_fill_(0, flat, neg_inf)
    return torch.stack(picks, dim=1)
