"""The greedy log-det loop: its host loop (CPU) and its batched loop (GPU, compiled) against the
explicit-determinant oracle and against each other."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import greedy_by_logdet

from otprune.methods._greedy import greedy_batched, greedy_host, greedy_logdet


def psd_kernel(seed: int, n: int, rank: int, identity: bool) -> np.ndarray:
    """(n, n) fp64 PSD: V V^T with V (n, rank), plus I when `identity` (OTPrune's shape)."""
    v = np.random.default_rng(seed).normal(size=(n, rank))
    return v @ v.T + (np.eye(n) if identity else 0.0)


@pytest.mark.parametrize("n, rank, k, identity", [(12, 12, 6, True), (20, 5, 9, True), (15, 15, 15, False), (18, 4, 10, False)])
def test_host_and_batched_match_the_explicit_determinants(n, rank, k, identity):
    kernel = psd_kernel(n + rank, n, rank, identity)
    eps = None if identity else 1e-9
    # The oracle's fallback compares det ratios with eps: the same rule as d2 > eps.
    expected = greedy_by_logdet(kernel, k, min_gain=eps)
    valid = np.ones(n, dtype=bool)
    assert greedy_host(np.diagonal(kernel), kernel.__getitem__, valid, k, eps).tolist() == expected
    batched = greedy_batched(torch.from_numpy(kernel)[None], torch.from_numpy(valid)[None], k, eps)
    assert batched[0].tolist() == expected


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    rank=st.integers(1, 30),
    identity=st.booleans(),
)
def test_host_loop_equals_batched_loop_on_ragged_batches(seed, lengths, rank, identity):
    """fp64 random kernels (no near-ties): the same picks, padding never picked."""
    n, k = max(lengths), min(lengths)
    kernel = torch.zeros(len(lengths), n, n, dtype=torch.float64)
    for b, length in enumerate(lengths):
        kernel[b, :length, :length] = torch.from_numpy(psd_kernel(seed + b, length, rank, identity))
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    eps = None if identity else 1e-9
    host = greedy_logdet(kernel, valid, k, eps)  # the CPU takes the host loop
    assert torch.equal(host, greedy_batched(kernel, valid, k, eps))
    for b, length in enumerate(lengths):
        assert len(set(host[b].tolist())) == k and int(host[b].max()) < length


def test_rank_fallback_fills_with_the_unpicked_tokens_ascending():
    # Rank 2: after two picks nothing is left; then 0, 1, 2, ... without the picks.
    v = np.zeros((6, 2))
    v[4, 0], v[2, 1] = 3.0, 2.0
    kernel = v @ v.T
    valid = np.ones(6, dtype=bool)
    assert greedy_host(np.diagonal(kernel), kernel.__getitem__, valid, 5, eps=1e-9).tolist() == [4, 2, 0, 1, 3]
    batched = greedy_batched(torch.from_numpy(kernel)[None], torch.from_numpy(valid)[None], 5, 1e-9)
    assert batched[0].tolist() == [4, 2, 0, 1, 3]


def test_both_loops_keep_the_kernel_dtype_and_return_long():
    kernel = torch.eye(5)[None] * torch.arange(1.0, 6.0)
    valid = torch.ones(1, 5, dtype=torch.bool)
    for greedy in (greedy_logdet, greedy_batched):
        picks = greedy(kernel, valid, 3)
        assert picks.dtype == torch.long and picks.tolist() == [[4, 3, 2]]
