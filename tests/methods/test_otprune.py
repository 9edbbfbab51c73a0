import numpy as np
import pytest
import torch
from oracles import greedy_by_logdet, logdet, otprune_kernel

import otprune
from otprune.methods.otprune import OTPrune, official_order, symmetric_gram


@pytest.mark.parametrize(
    "n, d, k, gamma, seed",
    [(12, 5, 4, 0.01, 0), (20, 40, 6, 0.01, 1), (30, 8, 10, 0.05, 2), (25, 25, 25, 0.01, 3), (9, 300, 3, 0.1, 4)],
)
def test_matches_explicit_logdet_greedy(n, d, k, gamma, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    expected = greedy_by_logdet(otprune_kernel(x, gamma), k)
    greedy = otprune.select_tokens(torch.from_numpy(x), k, order="greedy", gamma=gamma)
    assert greedy.tolist() == expected
    assert otprune.select_tokens(torch.from_numpy(x), k, gamma=gamma).tolist() == sorted(expected)


def test_fp32_matches_fp64_oracle_on_paper_shape():
    x = np.random.default_rng(7).normal(size=(144, 512))
    expected = sorted(greedy_by_logdet(otprune_kernel(x), 14))
    got = otprune.select_tokens(torch.from_numpy(x).float(), 14)
    assert got.tolist() == expected


def test_kernel_is_exactly_the_definition():
    x = torch.randn(1, 50, 70, dtype=torch.float64)
    kernel = OTPrune(gamma=0.03).kernel(x)[0].numpy()
    np.testing.assert_allclose(kernel, otprune_kernel(x[0].numpy(), 0.03), rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.from_numpy(kernel), torch.from_numpy(kernel).T)


@pytest.mark.parametrize("n, blocks", [(100, 4), (300, 2), (515, 3), (1000, 4)])
def test_symmetric_gram(n, blocks):
    x = torch.randn(2, n, 33, dtype=torch.float64)
    gram = symmetric_gram(x, blocks)
    torch.testing.assert_close(gram, x @ x.transpose(1, 2))
    assert torch.equal(gram, gram.transpose(1, 2))


def test_gain_is_at_least_one_so_k_is_always_reached():
    # Duplicated tokens: a plain similarity kernel would be singular, L = I + PSD is not.
    x = torch.randn(5, 16).repeat(8, 1)  # 40 tokens, 5 distinct
    keep = otprune.select_tokens(x, 30)
    assert keep.unique().numel() == 30


def test_official_order_is_the_set_iteration_order():
    picks = [388, 389, 516, 383, 5, 130]
    assert sorted(official_order(picks)) == sorted(picks)
    assert official_order(picks) == list(set(picks))


def test_objective_is_monotone_and_submodular():
    rng = np.random.default_rng(0)
    kernel = otprune_kernel(rng.normal(size=(20, 12)))
    for _ in range(200):
        b = set(rng.choice(20, size=rng.integers(1, 12), replace=False).tolist())
        a = set(rng.choice(sorted(b), size=rng.integers(0, len(b) + 1), replace=False).tolist())
        i = int(rng.choice(sorted(set(range(20)) - b)))
        gain_a = logdet(kernel, a | {i}) - logdet(kernel, a)
        gain_b = logdet(kernel, b | {i}) - logdet(kernel, b)
        assert gain_b >= -1e-12  # monotone
        assert gain_a >= gain_b - 1e-9  # diminishing returns


def test_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        OTPrune(gamma=0)
