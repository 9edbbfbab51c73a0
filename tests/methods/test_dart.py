"""DART against an independent oracle written from the paper's description with explicit loops
(numpy, fp64): pivots by key L1 norm, then per pivot its least cosine-similar free image tokens;
the kept count, the schedule, the switches."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles_baselines import dart_oracle as oracle

from otprune import PruneConfig
from otprune.methods import IN_LLM_RULES, get_rule
from otprune.methods.dart import dart_keep, kept_count, pivot_order


def inputs(seed, v, t, c=16, d=12):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(v, c)), rng.normal(size=(v, d)), rng.normal(size=(t, c)), rng.normal(size=(t, d))


@settings(deadline=None, max_examples=50)
@given(seed=st.integers(0, 10_000), v=st.integers(5, 80), t=st.integers(4, 20), frac=st.floats(0.05, 1.0),
       pi=st.integers(1, 5), pt=st.integers(0, 4), start=st.integers(0, 60))
def test_matches_oracle(seed, v, t, frac, pi, pt, start):
    ik, ist, tk, tst = inputs(seed, v, t)
    k = round(frac * v)
    got = dart_keep(*(torch.from_numpy(a) for a in (ik, ist, tk, tst)), k, pi, pt, start)
    want = oracle(ik, ist, tk, tst, k, pi, pt, start)
    assert got.tolist() == want
    assert got.numel() == kept_count(v, k, pi, pt)


def test_official_count_and_paper_size():
    assert kept_count(576, 128, 4, 4) == 132  # the official code's count for max_num_trunction=128
    assert kept_count(576, 64, 4, 4) == 68
    assert kept_count(10, 100, 4, 4) == 10
    ik, ist, tk, tst = inputs(0, 576, 30, c=128, d=64)
    got = dart_keep(*(torch.from_numpy(a).float() for a in (ik, ist, tk, tst)), 128, start=35)
    assert got.numel() == 132 and len(set(got.tolist())) == 132 and got.tolist() == sorted(got.tolist())


def test_pivot_order_is_the_python_set_order():
    order = pivot_order([3, 40, 1, 2], [0, 5, 1, 2], 35, 576)
    positions = [35 + i for i in (3, 40, 1, 2)] + [35 + 576 + j for j in (0, 5, 1, 2)]
    expect = list(set(positions))
    back = [35 + i if kind == "image" else 35 + 576 + i for kind, i in order]
    assert back == expect


def test_text_pivots_need_text():
    ik, ist, tk, tst = inputs(1, 20, 2)
    with pytest.raises(ValueError, match="DART_PIVOTS_TEXT"):
        dart_keep(*(torch.from_numpy(a) for a in (ik, ist, tk, tst)), 10)


def test_rule_schedule_and_switches():
    assert "dart" in IN_LLM_RULES
    config = PruneConfig.from_env({"BASELINE": "DART", "SUBSET_RATIO": str(128 / 576)})
    assert (config.method, config.layer) == ("dart", 2)  # the official default layer
    rule = config.rule()
    assert rule.schedule(config, 576, 32) == [576] * 2 + [132] * 30
    config = PruneConfig.from_env({"BASELINE": "DART", "SUBSET_RATIO": "0.25", "LAYER_INDEX": "3",
                                   "DART_PIVOTS_IMAGE": "2", "DART_PIVOTS_TEXT": "6"})
    assert (config.rule().pivots_image, config.rule().pivots_text, config.layer) == (2, 6, 3)
    assert config.rule().schedule(config, 576, 32)[3] == 2 + 18 * 8
    with pytest.raises(ValueError, match="LAYER_INDEX"):
        PruneConfig.from_env({"BASELINE": "DART", "SUBSET_RATIO": "0.25", "LAYER_INDEX": "0"})  # no before-LLM variant
    with pytest.raises(ValueError, match="DART_PIVOTS_IMAGE"):
        PruneConfig.from_env({"BASELINE": "DART", "SUBSET_RATIO": "0.25", "DART_PIVOTS_IMAGE": "0"})
    with pytest.raises(ValueError, match="pivots_text"):
        get_rule("dart", pivots_text=-1)
