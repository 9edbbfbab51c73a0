import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import otprune

METHOD_NAMES = list(otprune.METHODS)


def features_for(seed: int, bsz: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(bsz, n, d, generator=torch.Generator().manual_seed(seed))


@settings(deadline=None, max_examples=40)
@given(
    method=st.sampled_from(METHOD_NAMES),
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    d=st.integers(1, 24),
    ratio=st.floats(0.01, 1.0),
)
def test_indices_are_ascending_unique_in_range_exactly_k(method, seed, n, d, ratio):
    x = features_for(seed, 1, n, d)[0]
    keep = otprune.select_tokens(x, ratio, method)
    k = max(1, round(ratio * n))
    assert keep.shape == (k,)
    assert keep.dtype == torch.long
    assert keep.tolist() == sorted(set(keep.tolist()))
    assert 0 <= int(keep.min()) and int(keep.max()) < n
    assert torch.equal(keep, otprune.select_tokens(x, ratio, method))  # deterministic


@settings(deadline=None, max_examples=30)
@given(
    method=st.sampled_from(METHOD_NAMES),
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    ratio=st.floats(0.05, 1.0),
)
def test_sample_alone_equals_sample_in_padded_batch(method, seed, lengths, ratio):
    n = max(lengths)
    x = features_for(seed, len(lengths), n, 12)
    x_padded = x.clone()
    for b, length in enumerate(lengths):
        x_padded[b, length:] = 1e3  # padding garbage must be ignored
    batch = otprune.select_tokens(x_padded, ratio, method, lengths=lengths)
    for b, length in enumerate(lengths):
        alone = otprune.select_tokens(x[b, :length], ratio, method)
        k = alone.numel()
        assert batch[b, :k].tolist() == alone.tolist()
        assert (batch[b, k:] == -1).all()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_ratio_one_keeps_everything(method):
    assert otprune.select_tokens(torch.randn(37, 9), 1.0, method).tolist() == list(range(37))


def clustered(seed: int, n: int = 576, d: int = 256) -> torch.Tensor:
    """Well-conditioned token sets: 40 clusters, a shared offset (like real embeddings)."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(40, d, generator=g)
    return centers[torch.randint(0, 40, (n,), generator=g)] + torch.randn(n, d, generator=g) + torch.randn(1, d, generator=g)


# min overlap of the kept sets from fp16 vs fp32 input over seeds 0..2. OTPrune: identical.
# DivPrune: >= 98% (one of 56 may swap). DPP's later greedy gains are near-ties on the cosine
# kernel, so fp16 rounding of the input can reorder them: >= 85%.
@pytest.mark.parametrize("method, min_overlap", [("otprune", 1.0), ("divprune", 0.98), ("dpp", 0.85)])
def test_fp16_input_matches_fp32_input(method, min_overlap):
    for seed in range(3):
        x = clustered(seed)
        a = set(otprune.select_tokens(x, 0.098, method).tolist())
        b = set(otprune.select_tokens(x.half(), 0.098, method).tolist())
        assert len(a & b) / len(a) >= min_overlap


def test_fp64_stays_fp64_and_bf16_is_accepted():
    x = torch.randn(40, 8, dtype=torch.float64)
    assert otprune.select_tokens(x, 0.25).tolist() == otprune.select_tokens(x, 0.25).tolist()
    assert otprune.select_tokens(x.bfloat16(), 0.25).shape == (10,)


def test_paper_shape():
    assert otprune.select_tokens(torch.randn(576, 64), 0.098).shape == (56,)


def test_k_rounds_half_to_even_like_python():
    # 0.5 * 5 = 2.5 -> 2 ; 0.5 * 7 = 3.5 -> 4 ; tiny ratio -> at least 1
    assert otprune.select_tokens(torch.randn(5, 3), 0.5, "first_k").numel() == round(2.5) == 2
    assert otprune.select_tokens(torch.randn(7, 3), 0.5, "first_k").numel() == round(3.5) == 4
    assert otprune.select_tokens(torch.randn(7, 3), 0.01, "first_k").numel() == 1
    lengths = torch.tensor([576, 2880, 2225, 10])
    assert otprune.keep_counts(0.098, lengths).tolist() == [max(1, round(0.098 * n)) for n in lengths.tolist()]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep=0), "keep=0"),
        (dict(keep=0.0), "keep=0.0"),
        (dict(keep=1.5), "keep=1.5"),
        (dict(keep=float("nan")), "keep=nan"),
        (dict(keep=True), "keep=True"),
        (dict(keep="0.1"), "keep='0.1'"),
        (dict(keep=11), "keep=11"),
        (dict(keep=2, method="nope"), "unknown selection method 'nope'.*otprune"),
        (dict(keep=2, gamma=0.1, method="divprune"), "unknown parameter.*gamma"),
        (dict(keep=2, order="random"), "order='random'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        otprune.select_tokens(torch.randn(10, 4), **kwargs)


def test_bad_features_and_lengths():
    with pytest.raises(ValueError, match="features"):
        otprune.select_tokens(torch.randn(2, 3, 4, 5), 1)
    with pytest.raises(ValueError, match="features"):
        otprune.select_tokens(torch.ones(4, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="features"):
        otprune.select_tokens([[1.0]], 1)
    with pytest.raises(ValueError, match="features"):
        otprune.select_tokens(torch.randn(0, 4), 1)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(10, 4)
        x[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            otprune.select_tokens(x, 2)
    with pytest.raises(ValueError, match="lengths"):
        otprune.select_tokens(torch.randn(2, 10, 4), 2, lengths=[10, 11])
    with pytest.raises(ValueError, match="lengths"):
        otprune.select_tokens(torch.randn(2, 10, 4), 2, lengths=[10])
    with pytest.raises(ValueError, match="lengths"):
        otprune.select_tokens(torch.randn(2, 10, 4), 2, lengths=[0, 3])


def test_huge_finite_values_are_not_mistaken_for_inf():
    x = torch.full((10, 4), 3e38)
    x[::2] = -3e38
    assert otprune.select_tokens(x, 2, "first_k").tolist() == [0, 1]


def test_registry_is_case_insensitive_with_aliases():
    assert otprune.METHODS["OURS"] is otprune.METHODS["otprune"] is otprune.METHODS["OTPrune"]
    assert otprune.METHODS["FIRSTK"] is otprune.METHODS["first_k"]
    assert "LastK" in otprune.METHODS and "fastv" not in otprune.METHODS
    assert list(otprune.METHODS) == ["otprune", "divprune", "dpp", "random", "uniform", "first_k", "last_k", "cdpruner"]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_features_that_require_grad(method):
    # e.g. a model forward outside torch.no_grad(): selection detaches, the result is the same.
    x = torch.randn(30, 8, requires_grad=True)
    assert torch.equal(otprune.select_tokens(x, 0.3, method), otprune.select_tokens(x.detach(), 0.3, method))


@pytest.mark.parametrize("method", list(otprune.METHODS))
def test_official_order_is_each_methods_own(method):
    """OTPRUNE_ORDER=official: OTPrune's code hands its picks over in Python-set order; DivPrune's
    code (and every other baseline) in ascending order."""
    from otprune.methods.otprune import official_order

    x = torch.randn(2, 300, 12, generator=torch.Generator().manual_seed(5))
    lengths = [300, 260]
    greedy = otprune.select_tokens(x, 0.3, method, lengths=lengths, order="greedy")
    official = otprune.select_tokens(x, 0.3, method, lengths=lengths, order="official")
    ascending = otprune.select_tokens(x, 0.3, method, lengths=lengths)
    for b in range(2):
        picks = [i for i in greedy[b].tolist() if i >= 0]
        got = [i for i in official[b].tolist() if i >= 0]
        expected = official_order(picks) if method == "otprune" else sorted(picks)
        assert got == expected
        if method != "otprune":
            assert torch.equal(official[b], ascending[b])
    assert official[1, -1] == -1  # padding slots stay -1
    single = otprune.select_tokens(x[0], 0.3, method, order="official")
    assert single.tolist() == [i for i in official[0].tolist() if i >= 0]


@pytest.mark.parametrize("method", list(otprune.METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_method_refuses_nan_or_inf_features(method, bad):
    """select_tokens' own check, or the method's (`checks_finite`: OTPrune's column-norm pass)."""
    x = torch.randn(3, 40, 8)
    x[2, 17, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        otprune.select_tokens(x, 0.25, method, lengths=[40, 30, 20])
    x[2, 17, 5] = 1e30  # huge but finite: selected (rescaled), never refused
    assert otprune.select_tokens(x, 0.25, method, lengths=[40, 30, 20]).shape == (3, 10)


@settings(deadline=None, max_examples=60)
@given(
    method=st.sampled_from(METHOD_NAMES),
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    d=st.integers(1, 12),
)
def test_padded_select_with_k_max_beyond_a_length_marks_extra_slots(method, seed, lengths, fractions, d):
    # TokenSelector.select on a padded batch: k_max may exceed a sample's length (lengths [40, 6], k [10, 2]);
    # no crash, each sample's first k[b] slots are distinct real tokens, every other slot is -1
    bsz, n = len(lengths), max(lengths)
    lengths_t = torch.tensor(lengths)
    k = torch.tensor([max(1, round(f * m)) for f, m in zip(fractions[: len(lengths)], lengths, strict=True)])
    k_max = int(k.max())
    x = features_for(seed, bsz, n, d)
    x = x.masked_fill((torch.arange(n) >= lengths_t[:, None])[..., None], 0.0)
    picks = otprune.get_method(method).select(x, lengths_t, k, k_max)
    assert picks.shape == (bsz, k_max) and picks.dtype == torch.long
    for b in range(bsz):
        row = picks[b].tolist()
        kept = row[: int(k[b])]
        assert len(set(kept)) == len(kept) and all(0 <= i < lengths[b] for i in kept)
        assert row[int(k[b]) :] == [-1] * (k_max - int(k[b]))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_issue_case_dpp_lengths_40_6(method):
    x = features_for(0, 2, 40, 8)
    x[1, 6:] = 0
    picks = otprune.get_method(method).select(x, torch.tensor([40, 6]), torch.tensor([10, 2]), 10)
    assert picks[1, 2:].tolist() == [-1] * 8 and len(set(picks[0].tolist())) == 10
    assert set(picks[1, :2].tolist()) <= set(range(6))
