"""Per-image distance of the kept tokens (`otprune.distance`, issue #16 point 1): the Eq. 4
objective and its Gaussian W2 against hand-worked values and against `otprune.analysis`'s
independent D x D route, the `OTPRUNE_DISTANCE` switch, and the records' fields."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otprune.config import distance_kind
from otprune.distance import attach, eq4_distance, kept_distances
from otprune.stats import SampleStats


def test_hand_worked_two_dimensions():
    """X = [[1, 0], [0, 1], [1, 1], [-1, 1]], keep {0, 1}.

    rms per dimension: sqrt(3/4) each, so Z = X / sqrt(3/4); Sigma = Z^T Z / 4 = [[1, 0], [0, 1]]
    (the cross moment is (0 + 0 + 1 - 1) / 3 = 0), Sigma_A = Z_A^T Z_A / 2 = (4/3) I / 2 = (2/3) I,
    so T = Tr(sqrt(2/3 I)) = 2 sqrt(2/3) and W2^2 = 2 + 4/3 - 4 sqrt(2/3).
    """
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    dist, objective = eq4_distance(x, torch.tensor([0, 1]))
    assert objective == pytest.approx(2 * math.sqrt(2 / 3), rel=1e-12)
    assert dist == pytest.approx(math.sqrt(2 + 4 / 3 - 4 * math.sqrt(2 / 3)), rel=1e-12)


def test_keeping_everything_is_distance_zero():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    dist, objective = eq4_distance(x, torch.arange(9))
    assert dist == pytest.approx(0.0, abs=1e-6) and objective == pytest.approx(5.0, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 24), d=st.integers(1, 12), seed=st.integers(0, 10_000), data=st.data())
def test_agrees_with_the_analysis_module(n, d, seed, data):
    """`otprune.analysis.distances` computes Sigma^1/2 explicitly (D x D eigh) or M = Z Sigma Z^T:
    a different route to the same numbers."""
    from otprune.analysis.distances import gaussian_w2, trace_objective

    k = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 10 ** data.draw(st.integers(-3, 3))
    kept = torch.randperm(n, generator=gen)[:k]
    dist, objective = eq4_distance(x, kept)
    assert objective == pytest.approx(float(trace_objective(x, kept)), rel=1e-9, abs=1e-9)
    assert dist == pytest.approx(gaussian_w2(x, kept), rel=1e-6, abs=1e-6)


def test_kept_distances_kinds_and_undefined_entries():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    kept = torch.tensor([0, 5, 7])
    assert kept_distances("off", [x], [kept]) is None
    found = kept_distances("trace", [x, None, x], [kept, None, torch.zeros(0, dtype=torch.long)])
    assert found.kind == "trace" and found.distance[1:] == [None, None] and found.objective[1:] == [None, None]
    assert found.distance[0] == pytest.approx(eq4_distance(x, kept)[0]) and found.ms >= 0
    calls = []
    exact = kept_distances("w2", [x], [kept], exact=lambda f, k: calls.append((f.shape, k.tolist())) or 1.5)
    assert exact.distance == [1.5] and calls == [((12, 4), [0, 5, 7])]
    assert exact.objective[0] == pytest.approx(found.objective[0])
    with pytest.raises(ValueError, match="OTPRUNE_DISTANCE='w2'"):
        kept_distances("w2", [x], [kept])
    with pytest.raises(ValueError, match="must be one of off, trace, w2"):
        kept_distances("exact", [x], [kept])


def test_switch_default_and_errors():
    assert distance_kind({}) == "trace" and distance_kind({"OTPRUNE_DISTANCE": " "}) == "trace"
    assert distance_kind({"OTPRUNE_DISTANCE": "W2"}) == "w2" and distance_kind({"OTPRUNE_DISTANCE": "off"}) == "off"
    with pytest.raises(ValueError, match=r"OTPRUNE_DISTANCE='pot': must be one of off, trace, w2"):
        distance_kind({"OTPRUNE_DISTANCE": "pot"})


def test_attach_gives_each_sample_its_own_images():
    stats = [SampleStats(None, None, None, None, {}, [4, 4], [2, 2], 3, 2, [4]),
             SampleStats(None, None, None, None, {}, [4], [2], 3, 2, [2])]
    found = kept_distances("trace", [torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)],
                           [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([1, 3])])
    attach(stats, [[0, 1], [2]], found)
    assert stats[0].distance == found.distance[:2] and stats[1].distance == found.distance[2:]
    assert stats[1]["distance_kind"] == "trace" and stats[1]["distance_ms"] == found.ms
    assert stats[1]["objective"] == found.objective[2:]
