"""VisionZip against an independent oracle written from the paper's description with explicit
loops (numpy, fp64): per-head CLS attention, dominant tokens, contextual tokens as target +
mean of the tokens assigned to it by key cosine; batch == alone; the official budget split."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles_baselines import visionzip_oracle as oracle

from otprune import PruneConfig
from otprune.methods import MERGERS, get_merger
from otprune.methods.visionzip import CLS, VisionZip, split_budget, visionzip


def inputs(seed, b, n, d=12, c=16, sharp=4.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, 1 + n, d, generator=g, dtype=torch.float64)
    q = torch.randn(b, c, generator=g, dtype=torch.float64) * sharp
    keys = torch.randn(b, 1 + n, c, generator=g, dtype=torch.float64)
    return hidden, q, keys


@pytest.mark.parametrize("k, expected", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (2, (1, 1)), (3, (2, 1))])
def test_official_budget_split(k, expected):
    assert split_budget(k, 10 / 64) == expected


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 60), heads=st.sampled_from([1, 2, 4]), frac=st.floats(0.02, 1.0),
       contextual=st.sampled_from([10 / 64, 0.3, 0.6]))
def test_matches_oracle(seed, n, heads, frac, contextual):
    hidden, q, keys = inputs(seed, 1, n)
    k = min(n, max(2, round(frac * n)))
    tokens, sources = visionzip(hidden, q, keys, heads, k, contextual)
    dominant, ctx = split_budget(k, contextual)
    want_tokens, want_sources = oracle(hidden[0].numpy(), q[0].numpy(), keys[0].numpy(), heads, dominant, ctx)
    assert sources[0].tolist() == want_sources
    np.testing.assert_allclose(tokens[0].numpy(), want_tokens, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [576, 2880])
def test_batch_equals_alone_at_paper_sizes(n):
    hidden, q, keys = inputs(1, 3, n, d=32, c=64)
    tokens, sources = visionzip(hidden.float(), q.float(), keys.float(), 16, 64)
    assert tokens.shape == (3, 64, 32)
    for b in range(3):
        t1, s1 = visionzip(hidden[b : b + 1].float(), q[b : b + 1].float(), keys[b : b + 1].float(), 16, 64)
        assert torch.equal(s1[0], sources[b])
        torch.testing.assert_close(t1[0], tokens[b], rtol=1e-6, atol=1e-6)
        assert len(set(sources[b].tolist())) == 64  # no repeated source
        assert sources[b, 0] == CLS and (sources[b, 1:] >= 0).all()


def test_ratio_one_keeps_n_tokens_and_ratio_scale():
    hidden, q, keys = inputs(2, 1, 20)
    zip_ = VisionZip()
    res = zip_.merge_tower(hidden, q, keys, 4, 1.0)
    assert res.features.shape == (1, 20, 12) and res.counts.tolist() == [20]
    res = zip_.merge_tower(hidden, q, keys, 4, 0.111)
    assert res.counts.tolist() == [2]  # at least the CLS token and one contextual token


def test_dominant_scores_are_head_sums_not_full_width():
    """One head of width C differs from H heads: the per-head softmax is what ranks the patches."""
    hidden, q, keys = inputs(5, 1, 40)
    _, s4 = visionzip(hidden, q, keys, 4, 12)
    _, s1 = visionzip(hidden, q, keys, 1, 12)
    assert s4.tolist() != s1.tolist()


def test_registry_switches_and_errors():
    assert "visionzip" in MERGERS
    config = PruneConfig.from_env({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "0.111", "VISIONZIP_CONTEXTUAL": "0.2"})
    assert (config.method, config.layer, config.ratio, config.contextual) == ("visionzip", 0, 0.111, 0.2)
    assert config.merging
    with pytest.raises(ValueError, match="SUBSET_RATIO"):
        PruneConfig.from_env({"BASELINE": "VISIONZIP"})  # no adaptive default
    with pytest.raises(ValueError, match="VISIONZIP_CONTEXTUAL"):
        PruneConfig.from_env({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "0.1", "VISIONZIP_CONTEXTUAL": "1"})
    with pytest.raises(ValueError, match="LAYER_INDEX"):
        PruneConfig.from_env({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "2"})
    hidden, q, keys = inputs(0, 1, 10)
    with pytest.raises(ValueError, match="adaptive"):
        get_merger("visionzip").merge_tower(hidden, q, keys, 4, "iqr")
    with pytest.raises(ValueError, match="num_heads"):
        visionzip(hidden, q, keys, 3, 4)
