import numpy as np
import pytest
import torch
from oracles import cosine_kernel, greedy_by_logdet

import otprune


@pytest.mark.parametrize("n, d, k, seed", [(12, 20, 5, 0), (25, 64, 10, 1), (10, 10, 10, 2)])
def test_matches_explicit_logdet_greedy(n, d, k, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    got = otprune.select_tokens(torch.from_numpy(x), k, "dpp", order="greedy")
    assert got.tolist() == greedy_by_logdet(cosine_kernel(x), k)


def test_rank_exhausted_fills_ascending():
    # D = 3: the cosine kernel has rank 3, so only 3 picks have positive gain.
    x = np.random.default_rng(3).normal(size=(10, 3))
    got = otprune.select_tokens(torch.from_numpy(x), 7, "dpp", order="greedy").tolist()
    expected = greedy_by_logdet(cosine_kernel(x), 7, min_gain=1e-6)
    assert got == expected
    assert got[3:] == sorted(got[3:])  # the fallback picks are ascending
    assert len(set(got)) == 7


def test_zero_token_is_only_a_fallback_pick():
    x = torch.randn(6, 8)
    x[2] = 0
    got = otprune.select_tokens(x, 6, "dpp", order="greedy").tolist()
    assert got[-1] == 2
