import numpy as np
import pytest
import torch
from oracles import divprune_reference

import otprune


@pytest.mark.parametrize("n, d, k, seed", [(15, 4, 5, 0), (30, 50, 12, 1), (8, 3, 8, 2), (40, 16, 1, 3)])
def test_matches_max_min_definition(n, d, k, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    got = otprune.select_tokens(torch.from_numpy(x), k, "divprune", order="greedy")
    assert got.tolist() == divprune_reference(x, k)


def test_duplicates_are_not_picked_twice_before_distinct_tokens():
    base = torch.randn(6, 10)
    x = torch.cat([base, base])  # every token twice
    keep = otprune.select_tokens(x, 6, "divprune")
    assert sorted(set(i % 6 for i in keep.tolist())) == list(range(6))


def test_single_token():
    assert otprune.select_tokens(torch.randn(1, 8), 1, "divprune").tolist() == [0]
