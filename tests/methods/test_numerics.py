"""Numerics of the selection core (issue #16, points 5-6): scale invariance, the gamma bound, no
repeated index whatever the input, and batch == alone in fp32."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import otprune
from otprune.methods._greedy import greedy_batched, greedy_logdet
from otprune.methods._numerics import max_abs, one_thread, pow2_scale
from otprune.methods.otprune import OTPrune, gamma_limit

FEATURE_METHODS = ["otprune", "divprune", "dpp", "cdpruner"]  # the methods that compute with the features
METHOD_NAMES = list(otprune.METHODS)


def gaussian(seed: int, n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + torch.randn(1, d, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pow2_scale_is_an_exact_power_of_two_into_half_one(dtype):
    amax = torch.tensor([1e-30, 3e-8, 0.5, 0.75, 1.0, 7.0, 1e20, 1e30, 0.0], dtype=dtype)
    scale = pow2_scale(amax)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()  # powers of two: multiplying by them is exact
    scaled = amax * scale
    assert ((scaled >= 0.5) & (scaled < 1.0))[:-1].all() and scale[-1] == 1.0
    x = torch.randn(3, 7, 5, dtype=dtype)
    assert torch.equal(max_abs(x, 1), x.abs().amax(1, keepdim=True))


@pytest.mark.parametrize("method", FEATURE_METHODS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_audit_extreme_scales_are_not_first_k(method, scale):
    """Audit: features * 1e20 (fp32) silently gave First-K (column norms overflowed)."""
    x = gaussian(0, 576, 64)
    expected = otprune.select_tokens(x, 56, method)
    assert expected.tolist() != list(range(56))
    assert torch.equal(otprune.select_tokens(x * scale, 56, method), expected)


@settings(deadline=None, max_examples=40)
@given(
    method=st.sampled_from(FEATURE_METHODS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
    n=st.integers(2, 48),
    d=st.integers(1, 24),
    power=st.integers(-99, 99),
)
def test_power_of_two_scales_give_identical_picks(method, dtype, seed, n, d, power):
    """x and 2^k x (1e-30 .. 1e30): the rescaling makes the arithmetic bit-identical."""
    x = gaussian(seed, n, d, dtype)
    k = max(1, n // 3)
    expected = otprune.select_tokens(x, k, method, order="greedy")
    assert torch.equal(otprune.select_tokens(x * 2.0**power, k, method, order="greedy"), expected)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_decimal_scales_give_the_same_picks(method):
    """c * x for c = 1e-30 .. 1e30 differs from x by one rounding of the input; on inputs with no
    greedy near-tie (random tokens) the picks are the same."""
    for seed in range(3):
        x = gaussian(seed, 200, 48)
        expected = otprune.select_tokens(x, 20, method, order="greedy")
        for exponent in range(-30, 31, 5):
            c = 3.7 * 10.0**exponent
            assert torch.equal(otprune.select_tokens(x * c, 20, method, order="greedy"), expected), (seed, c)


def test_gamma_where_the_kernel_overflows_is_rejected():
    """Audit: select_tokens(x, 56, "otprune", gamma=1e39) returned [0, 0, 0, ...]."""
    x = gaussian(0, 576, 64)
    with pytest.raises(ValueError, match=r"gamma=1e\+39 \(OTPRUNE_GAMMA\).*<= 3\.403e\+38"):
        otprune.select_tokens(x, 56, "otprune", gamma=1e39)
    limit = gamma_limit(64)
    assert limit == pytest.approx(torch.finfo(torch.float32).max / 64**2)
    with pytest.raises(ValueError, match=r"OTPRUNE_GAMMA.*D=64 features.*gamma must be <= 8\.308e\+34"):
        otprune.select_tokens(x, 56, "otprune", gamma=limit * 1.01)
    keep = otprune.select_tokens(x, 56, "otprune", gamma=limit)  # at the bound: representable
    assert keep.unique().numel() == 56
    # One bound for every input dtype (fp64 features too).
    assert otprune.select_tokens(x.double(), 56, "otprune", gamma=limit).unique().numel() == 56
    with pytest.raises(ValueError, match="OTPRUNE_GAMMA"):
        otprune.select_tokens(x.double(), 56, "otprune", gamma=1e36)
    with pytest.raises(ValueError, match="OTPRUNE_GAMMA"):
        otprune.PruneConfig(method="otprune", layer=0, ratio=0.1, gamma=1e39)


def test_gamma_bound_is_tight():
    # A single non-zero token: S = [[D]], S S^T = [[D^2]], the largest entry the bound allows for.
    for d in (1, 3, 64):
        x = torch.zeros(4, d, dtype=torch.float64)
        x[1] = torch.arange(1, d + 1)
        kernel = OTPrune(gamma=1.0).kernel(x[None])[0]
        assert kernel[1, 1] == 1 + d**2 and kernel.abs().max() == 1 + d**2


def degenerate(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    x = gaussian(seed, n, d)
    if kind == "zeros":
        return torch.zeros(n, d)
    if kind == "constant":
        return torch.full((n, d), 0.3)
    if kind == "duplicates":
        return x[: max(1, n // 4)].repeat(n, 1)[:n]  # exact copies
    if kind == "one_token":
        y = torch.zeros(n, d)
        y[n // 2] = x[0]
        return y
    if kind == "zero_columns":
        x[:, ::2] = 0.0
        return x
    if kind == "mixed_magnitudes":
        return x * torch.logspace(-15, 15, d)
    return x


@settings(deadline=None, max_examples=120)
@given(
    method=st.sampled_from(METHOD_NAMES),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    kind=st.sampled_from(["random", "zeros", "constant", "duplicates", "one_token", "zero_columns", "mixed_magnitudes"]),
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    d=st.integers(1, 16),
    power=st.integers(-99, 99),
    mantissa=st.floats(1.0, 1.99),
    ratio=st.floats(0.01, 1.0),
    huge_gamma=st.booleans(),
)
def test_never_a_repeated_index(method, dtype, kind, seed, n, d, power, mantissa, ratio, huge_gamma):
    x = degenerate(kind, n, d, seed).double() * (mantissa * 2.0**power)  # 1e-30 .. 1e30
    if dtype == torch.float16:
        x = x / max(1.0, float(x.abs().max()) / 6e4)  # fp16 stops at 65504
    x = x.to(dtype)
    if not torch.isfinite(x).all():
        x = torch.nan_to_num(x, posinf=1.0, neginf=-1.0)  # mixed magnitudes beyond the dtype's range
    params = {}
    if method == "otprune" and huge_gamma:
        params["gamma"] = gamma_limit(d)
    keep = otprune.select_tokens(x, ratio, method, order="greedy", **params).tolist()
    k = max(1, round(ratio * n))
    assert len(keep) == k == len(set(keep))
    assert all(0 <= i < n for i in keep)


def test_greedy_never_repicks_even_on_a_broken_kernel():
    """The greedy's own guarantee: NaN, inf and negative kernel values never repeat a pick."""
    n = 8
    for bad in (float("nan"), float("inf"), float("-inf"), -1e30):
        kernel = torch.eye(n)[None].repeat(2, 1, 1) * 2.0
        kernel[:, 3, :] = bad
        kernel[:, :, 5] = bad
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, 6:] = False
        for eps, greedy in itertools.product((None, 1e-6, 0.0), (greedy_logdet, greedy_batched)):
            picks = greedy(kernel, valid, 6, eps=eps)
            for b in range(2):
                assert len(set(picks[b].tolist())) == 6 and int(picks[b].max()) < (n if b == 0 else 6)


def test_one_thread_scope_restores_the_thread_count_and_nests():
    before = torch.get_num_threads()
    with one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        with one_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with one_thread(torch.device("meta")):  # not the CPU: untouched
        assert torch.get_num_threads() == before


@settings(deadline=None, max_examples=40)
@given(
    method=st.sampled_from(METHOD_NAMES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 160), min_size=2, max_size=4),
    d=st.integers(2, 40),
    ratio=st.floats(0.05, 1.0),
)
def test_batch_equals_alone_in_fp32_and_fp64(method, dtype, seed, lengths, d, ratio):
    """A sample gives the same indices alone or in a ragged batch, in fp32 too: each sample runs
    on its own slice (the same arithmetic as alone), including DPP's rank cut-off (K > D here)."""
    x = torch.stack([gaussian(seed + b, max(lengths), d, dtype) for b in range(len(lengths))])
    batch = otprune.select_tokens(x, ratio, method, lengths=lengths, order="greedy")
    for b, length in enumerate(lengths):
        alone = otprune.select_tokens(x[b, :length].clone(), ratio, method, order="greedy")
        assert batch[b, : alone.numel()].tolist() == alone.tolist()
        assert (batch[b, alone.numel() :] == -1).all()


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_audit_ragged_batch_equals_alone_in_fp32(method):
    """Audit: lengths 576/400/123/560, D = 128, fp32: DPP matched alone in 17-36 of 45 cases (where
    K exceeds the kernel's rank the cut-off fell differently), OTPrune in 44 of 45."""
    lengths = [576, 400, 123, 560]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 576, 128, generator=g) + torch.randn(1, 1, 128, generator=g)
    for ratio in (0.098, 0.5, 0.95):  # K > D = 128 for the last two
        batch = otprune.select_tokens(x, ratio, method, lengths=lengths, order="greedy")
        for b, length in enumerate(lengths):
            alone = otprune.select_tokens(x[b, :length].clone(), ratio, method, order="greedy")
            assert batch[b, : alone.numel()].tolist() == alone.tolist()


def test_uniform_batch_equals_alone():
    x = gaussian(3, 3 * 300, 64).view(3, 300, 64)
    for method in FEATURE_METHODS:
        batch = otprune.select_tokens(x, 0.3, method, order="greedy")
        for b in range(3):
            assert torch.equal(batch[b], otprune.select_tokens(x[b].clone(), 0.3, method, order="greedy"))


def test_fp16_and_bf16_extremes_are_finite_inputs():
    # bf16 covers fp32's range: 1e30 is a valid bf16 feature value and selects like 1.
    x = gaussian(0, 100, 16)
    expected = otprune.select_tokens(x.bfloat16(), 10)
    assert torch.equal(otprune.select_tokens((x * 2.0**99).bfloat16(), 10), expected)
    assert math.isfinite(float((x * 2.0**99).bfloat16().float().abs().max()))
