import collections

import pytest
import torch

import otprune
from otprune.methods.random import RandomSelect, hash32, position_scores


def test_seeded_and_reproducible():
    x = torch.randn(100, 8)
    a = otprune.select_tokens(x, 10, "random", seed=3)
    assert torch.equal(a, otprune.select_tokens(x, 10, "random", seed=3))
    assert not torch.equal(a, otprune.select_tokens(x, 10, "random", seed=4))


def test_roughly_uniform_over_positions():
    counts = collections.Counter()
    for seed in range(2000):
        counts.update(otprune.select_tokens(torch.zeros(20, 2), 5, "random", seed=seed).tolist())
    # 2000 draws x 5 of 20 -> 500 per position, sd ~ 19.4; allow 5 sd.
    assert all(abs(counts[i] - 500) < 100 for i in range(20)), counts


def test_hash_is_a_bijection_on_a_range():
    x = torch.arange(1 << 16, dtype=torch.int64)
    assert hash32(x).unique().numel() == 1 << 16
    assert position_scores(0, 1000).unique().numel() == 1000


def test_scores_prefix_stable():
    assert torch.equal(position_scores(5, 40), position_scores(5, 400)[:40])


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        RandomSelect(seed=1.5)
