import numpy as np
import pytest
import torch
from oracles import greedy_by_explicit_det, greedy_by_logdet, logdet, otprune_kernel

import otprune
from otprune.methods._greedy import greedy_logdet
from otprune.methods.otprune import (
    OTPrune,
    column_prescaled,
    column_scales,
    column_sq_norms,
    column_stats,
    column_weights,
    duplicate_representatives,
    official_order,
    read_through,
    row_keys,
    symmetric_gram,
)


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


def _with_copies(n: int, d: int, copies: dict[int, int], seed: int = 0) -> torch.Tensor:
    """(n, d) random fp32 tokens; token `dst` is an exact copy of token `src` for each src: dst."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    for src, dst in copies.items():
        x[dst] = x[src]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicated_tokens_get_exactly_equal_kernel_values(dtype):
    # Copies far apart land in different row blocks of the block-triangular GEMMs.
    copies = {3: 500, 10: 590, 200: 201}
    x = _with_copies(600, 48, copies).to(dtype)
    kernel = OTPrune().kernel(x[None])[0]
    assert torch.equal(kernel, kernel.T)
    for src, dst in copies.items():
        assert kernel[src, src] == kernel[dst, dst]
        others = torch.ones(600, dtype=torch.bool)
        others[[src, dst]] = False
        assert torch.equal(kernel[src, others], kernel[dst, others])
        assert kernel[src, dst] == kernel[dst, src]
    # And still the definition, to rounding.
    reference = otprune_kernel(x.double().numpy())
    np.testing.assert_allclose(kernel.double().numpy(), reference, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-9)


def test_duplicate_representatives_are_the_lowest_exact_copy():
    x = _with_copies(300, 16, {5: 150, 150: 299, 7: 8})  # 5 == 150 == 299, 7 == 8
    x[40] = x[41] + 1e-6  # a near-duplicate: never merged
    x[100:104] = 0.0  # zero tokens are exact copies of each other
    x[60] = x[50][[2, 1, 0, *range(3, 16)]]  # same fingerprint as token 50 (a swap within one half)
    assert torch.equal(row_keys(x[None])[0, 60], row_keys(x[None])[0, 50])
    rep = duplicate_representatives(x[None])[0].tolist()
    expected = [next(j for j in range(i + 1) if torch.equal(x[j], x[i]) or torch.equal(x[j], -x[i])) for i in range(300)]
    assert rep == expected
    assert rep[299] == 5 and rep[8] == 7 and rep[41] == 41 and rep[103] == 100 and rep[60] == 60
    # No copies at all: every token is its own representative (the comparison is skipped).
    assert duplicate_representatives(torch.randn(2, 50, 8)).tolist() == [list(range(50))] * 2


def test_exact_tie_goes_to_the_lowest_index():
    # Two copies of the token with the largest kernel diagonal: the first pick is a tie.
    x = _with_copies(600, 64, {7: 400})
    x[7] *= 6.0
    x[400] = x[7]
    diag = OTPrune().kernel(x[None])[0].diagonal()
    assert diag[7] == diag[400] == diag.max()
    assert otprune.select_tokens(x, 5, order="greedy")[0] == 7
    # Moving the copy in front of the original moves the pick with it.
    y = x.clone()
    y[[7, 400]] = y[[400, 7]]
    y[3] = y[7]
    assert otprune.select_tokens(y, 5, order="greedy")[0] == 3
    # The greedy itself: on equal gains at any step, the lowest index.
    kernel = torch.eye(6, dtype=torch.float64)[None] * torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, 3.0], dtype=torch.float64)
    picks = greedy_logdet(kernel, torch.ones(1, 6, dtype=torch.bool), 6)
    assert picks[0].tolist() == [2, 3, 5, 1, 4, 0]


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


def test_padding_is_nobodys_copy_and_copies_in_a_ragged_batch_tie_low():
    from otprune.methods.otprune import representatives

    x = torch.randn(2, 40, 8)
    x[0, 30:] = 0.0  # padding of sample 0 (length 30)
    x[1, 20] = x[1, 3]
    valid = torch.arange(40)[None] < torch.tensor([30, 40])[:, None]
    rep, sign, copies = representatives(x, valid)
    assert bool((sign == 1).all())
    assert copies is True
    assert rep[0].tolist() == list(range(40))  # padding rows keep their own index
    assert rep[1, 20] == 3 and rep[1].tolist().count(3) == 2
    rep0, _, copies0 = representatives(x[:1], valid[:1])
    assert copies0 is False and rep0[0].tolist() == list(range(40))  # padding alone is not a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("power", [0, -20, 20])
def test_features_read_in_place_give_the_same_s_as_the_rescaled_copy(dtype, power):
    """Ordinary magnitudes skip the rescaled copy (`column_weights`); S is bit-identical to the
    copy's, whose columns' largest |value| lies in [0.5, 1)."""
    x = torch.randn(1, 300, 70, dtype=dtype) * 3.0 * 2.0**power
    features, weights = column_weights(x)
    assert features is x  # no copy
    scaled = column_prescaled(x)
    assert not torch.equal(scaled, x)
    assert torch.equal(symmetric_gram(features, scale=weights), symmetric_gram(scaled, scale=column_scales(scaled)))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_or_zero_columns_take_the_rescaled_copy(scale):
    x = torch.randn(1, 40, 8) * scale
    features, _ = column_weights(x)
    assert torch.equal(features, column_prescaled(x))
    x = torch.randn(1, 40, 8)
    x[..., 3] = 0.0  # an all-zero dimension: told apart from underflow only by the rescaling
    features, weights = column_weights(x)
    assert torch.equal(features, column_prescaled(x)) and weights[0, 0, 3] == 0


def test_read_through_sets_every_entry_from_the_representatives():
    gram = torch.randn(2, 7, 7)
    gram = gram + gram.transpose(1, 2)
    rep = torch.tensor([[0, 1, 1, 3, 0, 5, 3], list(range(7))])
    expected = torch.stack([gram[b][rep[b]][:, rep[b]] for b in range(2)])
    read_through(gram, rep)
    assert torch.equal(gram, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_stats_equal_the_separate_ones(dtype):
    x = torch.randn(2, 150, 33, dtype=dtype)  # 150 tokens: chunks of 64, 64, 22
    x[1, 140] = x[1, 7]
    sq, keys = column_stats(x)
    assert torch.equal(keys, row_keys(x))
    assert torch.equal(sq, column_sq_norms(x))
    torch.testing.assert_close(sq, (x * x).sum(1, keepdim=True))
    assert keys[1, 140] == keys[1, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("copies", [{}, {3: 500, 10: 590, 200: 201, 7: 8}])
def test_rows_from_s_pick_as_the_formed_kernel(monkeypatch, dtype, copies):
    """Up to ROWS_FROM_S tokens the CPU greedy computes its kernel rows from S; beyond, it reads the
    formed kernel. Copies tie exactly in both and go to the lowest index; in fp64 (no near-tie that
    the two summation orders could split) the picks are the same."""
    import otprune.methods.otprune as module

    x = _with_copies(600, 48, copies, seed=3).to(dtype)
    x[[3, 10, 200, 7]] *= 4.0  # the originals (and so their copies) are picked early
    for src, dst in copies.items():
        x[dst] = x[src]
    picks = {}
    for path, limit in (("rows", module.ROWS_FROM_S), ("formed", 0)):
        monkeypatch.setattr(module, "ROWS_FROM_S", limit)
        picks[path] = otprune.select_tokens(x, 60, order="greedy").tolist()
        for src, dst in copies.items():
            assert src in picks[path] and (dst not in picks[path] or picks[path].index(src) < picks[path].index(dst))
    if dtype == torch.float64:
        assert picks["rows"] == picks["formed"]


def _with_negations(n: int, d: int, pairs: dict[int, int], seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    for src, dst in pairs.items():
        x[dst] = -x[src]
    return x


def test_negations_are_copies_up_to_sign():
    x = _with_negations(300, 16, {5: 150, 7: 8, 40: 20})  # 150 = -5, 8 = -7, 20 = -40 (the negation first)
    x[299] = x[5]  # a plain copy of 5
    x[60] = x[50].clone()
    x[60, 3] = -x[60, 3]  # one sign flipped: neither copy nor negation
    x[100:103] = 0.0
    x[101] = -x[101]  # -0.0: a zero row is a copy, sign 1
    keys = row_keys(x[None])[0]
    assert keys[150] == keys[5] == keys[299] and keys[8] == keys[7]
    from otprune.methods.otprune import representatives

    rep, sign, copies = representatives(x[None])
    rep, sign = rep[0].tolist(), sign[0].tolist()
    assert copies is True
    assert (rep[150], sign[150]) == (5, -1.0) and (rep[299], sign[299]) == (5, 1.0)
    assert (rep[8], sign[8]) == (7, -1.0) and (rep[40], sign[40]) == (20, -1.0) and rep[60] == 60
    assert (rep[101], sign[101], rep[102]) == (100, 1.0, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negated_tokens_get_exactly_negated_kernel_values(dtype):
    pairs = {3: 500, 10: 590, 200: 201}
    x = _with_negations(600, 48, pairs, dtype=dtype)
    kernel = OTPrune().kernel(x[None])[0]
    assert torch.equal(kernel, kernel.T)
    for src, dst in pairs.items():
        assert kernel[src, src] == kernel[dst, dst]
        others = torch.ones(600, dtype=torch.bool)
        others[[src, dst]] = False
        assert torch.equal(kernel[src, others], -kernel[dst, others])
    np.testing.assert_allclose(kernel.double().numpy(), otprune_kernel(x.double().numpy()),
                               rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-9)


def test_read_through_with_signs():
    gram = torch.randn(1, 6, 6, dtype=torch.float64)
    gram = gram + gram.transpose(1, 2)
    rep = torch.tensor([[0, 0, 2, 2, 4, 0]])
    sign = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    s, r = sign[0], rep[0]
    expected = (s[:, None] * s[None, :] * gram[0][r][:, r])[None]
    read_through(gram, rep, sign)
    assert torch.equal(gram, expected)


def test_negations_and_copies_tie_to_the_lowest_index_as_the_official_picks():
    """fp64 picks (both greedy paths) against an explicit-determinant greedy that breaks exact ties
    (within 1e-9 relative) by the lowest index, over 300 random inputs: N 5..150, D 2..64, 1-6
    negated tokens placed anywhere (half of them the largest, so they tie at the first steps), a
    few plain copies, magnitudes 1e-200..1e200 (before: 4 of them went to the higher index)."""
    import random

    import otprune.methods.otprune as module

    rng = random.Random(0)
    default = module.ROWS_FROM_S
    for seed in range(300):
        n, d = rng.randint(5, 150), rng.randint(2, 64)
        scale = rng.choice([1.0, 1e-200, 1e200, 1e-30, 1e30])
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for _ in range(rng.randint(1, 6)):
            src, dst = rng.randrange(n), rng.randrange(n)
            if src != dst:
                if rng.random() < 0.5:
                    x[src] *= 3.0
                x[dst] = -x[src] if rng.random() < 0.8 else x[src]
        k = min(n, rng.randint(1, 8))
        expected = greedy_by_explicit_det(otprune_kernel(x.numpy()), k)
        for limit in (default, 0):  # rows from S, and the formed kernel
            module.ROWS_FROM_S = limit
            try:
                assert otprune.select_tokens(x * scale, k, order="greedy").tolist() == expected, (seed, limit)
            finally:
                module.ROWS_FROM_S = default
