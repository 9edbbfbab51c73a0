"""otprune.analysis.distances against independent oracles: brute-force assignments, scipy's sqrtm, explicit kernels."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from otprune.analysis import distances as metrics


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _sqrtm(mat: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular PSD input is expected
        return np.real(scipy.linalg.sqrtm(mat))


# ----------------------------------------------------------------------------- exact W2


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 12), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_w2_of_a_set_to_itself_is_zero(n, d, seed):
    x = _rng(seed).normal(size=(n, d))
    assert metrics.wasserstein2(x, np.arange(n)) == 0.0
    assert metrics.wasserstein2(x, _rng(seed + 1).permutation(n)) == 0.0


def _brute_force_w2(x: np.ndarray, y: np.ndarray) -> float:
    """Equal-size uniform sets: OT is an assignment (Birkhoff); try every permutation."""
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    best = min(cost[np.arange(len(x)), list(p)].mean() for p in itertools.permutations(range(len(x))))
    return float(np.sqrt(best))


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 6), d=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_w2_between_equal_size_sets_matches_brute_force_permutations(n, d, seed):
    rng = _rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
    assert metrics.wasserstein2_between(x, y) == pytest.approx(_brute_force_w2(x, y), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "k", "d", "seed"), [(12, 4, 3, 0), (20, 5, 8, 1), (30, 10, 2, 2), (24, 24, 5, 3), (9, 1, 4, 4)])
def test_subset_w2_matches_an_assignment_with_replicated_kept_points(n, k, d, seed):
    """N = m * K: uniform OT from N points to K points equals the assignment of the N points to
    the K kept points each repeated m times (all masses then equal 1/N)."""
    rng = _rng(seed)
    x = rng.normal(size=(n, d))
    kept = np.sort(rng.choice(n, size=k, replace=False))
    targets = np.repeat(x[kept], n // k, axis=0)
    cost = ((x[:, None, :] - targets[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    expected = np.sqrt(cost[rows, cols].mean())
    assert metrics.wasserstein2(x, kept) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics.wasserstein2(torch.tensor(x, dtype=torch.float32), torch.tensor(kept)) == pytest.approx(expected, rel=1e-5)


def test_w2_matches_pot_with_unequal_sizes():
    import ot

    rng = _rng(5)
    x = rng.normal(size=(17, 6))
    kept = np.array([0, 3, 4, 9, 16])
    a, b = np.full(17, 1 / 17), np.full(5, 1 / 5)
    expected = np.sqrt(ot.emd2(a, b, ot.dist(x, x[kept])))
    assert metrics.wasserstein2(x, kept) == pytest.approx(expected, rel=1e-9)


def test_w2_batch_matches_single_images_and_skips_padding():
    rng = _rng(6)
    feats = torch.tensor(rng.normal(size=(3, 10, 4)))
    kept = torch.tensor([[0, 2, 5, -1], [1, 3, 4, 8], [6, -1, -1, -1]])
    lengths = torch.tensor([10, 9, 7])
    out = metrics.wasserstein2_batch(feats, kept, lengths)
    for b in range(3):
        row = kept[b][kept[b] >= 0]
        assert out[b].item() == pytest.approx(metrics.wasserstein2(feats[b, : lengths[b]], row), rel=1e-12)


@pytest.mark.parametrize(
    ("kept", "message"),
    [([0, 0, 1], "repeated"), ([0, 12], r"\[0, 9\]"), ([-1, 2], r"\[0, 9\]"), ([0.0, 1.0], "integer"), ([], "K >= 1")],
)
def test_bad_kept_indices_are_rejected(kept, message):
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match=message):
        metrics.wasserstein2(x, np.array(kept))


def test_bad_features_are_rejected():
    x = np.ones((5, 2))
    x[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.wasserstein2(x, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        metrics.trace_objective(np.ones(5), [0])
    with pytest.raises(ValueError, match="gamma"):
        metrics.logdet_objective(np.ones((5, 2)), [0], gamma=0.0)


# ----------------------------------------------------------------------------- Gaussian closed form


def _random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d + 2))
    return a @ a.T / a.shape[1]


def _direct_gaussian_w2_sq(m1, s1, m2, s2) -> float:
    root = _sqrtm(s1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm(root @ s2 @ root)))


@settings(deadline=None, max_examples=25)
@given(d=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_gaussian_w2_matches_the_direct_formula_with_scipy_sqrtm(d, seed):
    rng = _rng(seed)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
    got = metrics.gaussian_w2_squared(torch.tensor(m1), torch.tensor(s1), torch.tensor(m2), torch.tensor(s2))
    assert got.item() == pytest.approx(_direct_gaussian_w2_sq(m1, s1, m2, s2), rel=1e-7, abs=1e-9)


def test_gaussian_w2_special_cases_and_batching():
    rng = _rng(7)
    s = torch.tensor(_random_psd(rng, 4))
    m = torch.tensor(rng.normal(size=4))
    assert metrics.gaussian_w2_squared(m, s, m, s).item() == pytest.approx(0.0, abs=1e-10)
    # 1-D: (m1 - m2)^2 + (sigma1 - sigma2)^2
    one = metrics.gaussian_w2_squared(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert one.item() == pytest.approx(9.0 + 1.0)
    # commuting (diagonal) covariances: sum (sqrt a - sqrt b)^2
    a, b = torch.tensor([1.0, 4.0, 0.0]), torch.tensor([9.0, 1.0, 2.0])
    diag = metrics.gaussian_w2_squared(torch.zeros(3), torch.diag(a), torch.zeros(3), torch.diag(b))
    assert diag.item() == pytest.approx(float(((a.sqrt() - b.sqrt()) ** 2).sum()))
    # batched over a leading dimension
    s1 = torch.stack([torch.tensor(_random_psd(rng, 3)) for _ in range(5)])
    s2 = torch.stack([torch.tensor(_random_psd(rng, 3, rank=1)) for _ in range(5)])  # singular
    m1, m2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    batch = metrics.gaussian_w2_squared(m1, s1, m2, s2)
    for i in range(5):
        expect = _direct_gaussian_w2_sq(m1[i].numpy(), s1[i].numpy(), m2[i].numpy(), s2[i].numpy())
        assert batch[i].item() == pytest.approx(expect, rel=1e-6, abs=1e-8)


def _direct_moments(x: np.ndarray, kept: np.ndarray, centred: bool):
    """Independent restatement of the module's Sigma and Sigma_A."""
    z = x - x.mean(0) if centred else x
    z = z / np.sqrt((z**2).mean(0))
    za = z[kept]
    if centred:
        za = za - za.mean(0)
    return z.T @ z / len(z), za.T @ za / len(za)


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize(("n", "d", "k"), [(20, 10, 5), (15, 3, 6), (12, 12, 12), (9, 4, 1)])
def test_trace_objective_matches_direct_sqrtm(n, d, k, centred):
    rng = _rng(n * 100 + d * 10 + k)
    x = rng.normal(size=(n, d)) + 0.3
    kept = np.sort(rng.choice(n, size=k, replace=False))
    sigma, sigma_a = _direct_moments(x, kept, centred)
    root = _sqrtm(sigma)
    expected = np.trace(_sqrtm(root @ sigma_a @ root))
    assert metrics.trace_objective(x, kept, centred=centred).item() == pytest.approx(expected, rel=1e-6)
    full, sub = metrics.gaussian_moments(x, kept, centred=centred)
    np.testing.assert_allclose(full.cov.numpy(), sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sub.cov.numpy(), sigma_a, rtol=1e-10, atol=1e-12)
    # the uncentred W2 of the Gaussian fits uses this trace
    if not centred:
        w2_sq = np.trace(sigma) + np.trace(sigma_a) - 2 * expected
        assert metrics.gaussian_w2(x, kept) ** 2 == pytest.approx(max(w2_sq, 0.0), rel=1e-6, abs=1e-8)


def test_trace_objective_of_all_tokens_is_the_dimension():
    x = _rng(8).normal(size=(40, 7))
    assert metrics.trace_objective(x, np.arange(40)).item() == pytest.approx(7.0, rel=1e-10)


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize(("n", "d", "k"), [(30, 20, 10), (25, 4, 9)])
def test_fast_batched_scorer_matches_direct_evaluation(n, d, k, centred):
    rng = _rng(9)
    x = rng.normal(size=(n, d))
    subsets = torch.stack([torch.tensor(np.sort(rng.choice(n, size=k, replace=False))) for _ in range(16)])
    scorer = metrics.TraceObjective(x, centred=centred)
    fast = scorer(subsets)
    fast32 = scorer(subsets, torch.float32)
    assert fast.dtype == torch.float64 and fast32.dtype == torch.float32 and fast.shape == (16,)
    for i, row in enumerate(subsets.numpy()):
        sigma, sigma_a = _direct_moments(x, row, centred)
        root = _sqrtm(sigma)
        expected = np.trace(_sqrtm(root @ sigma_a @ root))
        assert fast[i].item() == pytest.approx(expected, rel=1e-6)
        assert fast32[i].item() == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(metrics.trace_objective(x, subsets, centred=centred).numpy(), fast.numpy())


# ----------------------------------------------------------------------------- log-det surrogate


@settings(deadline=None, max_examples=20)
@given(n=st.integers(2, 15), d=st.integers(1, 8), gamma=st.sampled_from([0.005, 0.01, 0.1, 1.0]), seed=st.integers(0, 10_000))
def test_logdet_objective_matches_slogdet_of_the_explicit_kernel(n, d, gamma, seed):
    rng = _rng(seed)
    x = rng.normal(size=(n, d))
    k = int(rng.integers(1, n + 1))
    kept = np.sort(rng.choice(n, size=k, replace=False))
    xn = x / np.linalg.norm(x, axis=0)
    s = xn @ xn.T
    kernel = np.eye(n) + gamma * s @ s.T
    sign, expected = np.linalg.slogdet(kernel[np.ix_(kept, kept)])
    assert sign > 0
    assert metrics.logdet_objective(x, kept, gamma=gamma).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # Sylvester: the same value is log det(I_D + gamma Sigma^1/2 Sigma_A Sigma^1/2) with unscaled moments
    sigma, sigma_a = xn.T @ xn, xn[kept].T @ xn[kept]
    root = _sqrtm(sigma)
    _, via_d = np.linalg.slogdet(np.eye(d) + gamma * root @ sigma_a @ root)
    assert expected == pytest.approx(via_d, rel=1e-6, abs=1e-9)


def test_logdet_objective_batched_subsets():
    rng = _rng(10)
    x = rng.normal(size=(12, 5))
    subsets = np.array([[0, 1, 2], [3, 7, 11], [2, 5, 9]])
    batch = metrics.logdet_objective(x, subsets)
    assert batch.shape == (3,)
    for i in range(3):
        assert batch[i].item() == pytest.approx(metrics.logdet_objective(x, subsets[i]).item(), rel=1e-12)
