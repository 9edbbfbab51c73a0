"""PruMerge / PruMerge+ against independent oracles: the CLS attention computed by hand from a
tiny CLIP tower's own q/k projection weights, the IQR rule with numpy.percentile, the merge as an
explicit weighted sum (numpy, fp64)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import prumerge_kept as oracle_kept
from oracles import prumerge_merge as oracle_merge
from oracles import prumerge_outliers as oracle_outliers
from oracles import prumerge_scores as oracle_scores
from transformers import CLIPVisionConfig, CLIPVisionModel

import otprune
from otprune.methods import get_merger
from otprune.methods.prumerge import (
    SUMMARY,
    capture_projections,
    cls_attention,
    consuming_layer,
    encoder_layers,
    iqr_keep_count,
    uniform_additions,
)

KNN = 32


# ------------------------------------------------------------------ a tiny CLIP tower
def tiny_tower(seed=0, layers=3, image=28, patch=4):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=image, patch_size=patch, projection_dim=16)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so that outliers exist
        for layer in encoder_layers(model):
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def tower_outputs(model, images, select_layer=-2):
    """(features (B, N, C), q_cls, keys) through the hooks, and the hand-computed q / k (fp64)."""
    layers = encoder_layers(model)
    li = consuming_layer(select_layer, len(layers))
    attn = layers[li].self_attn
    with torch.no_grad(), capture_projections(attn.q_proj, attn.k_proj) as got:
        out = model(images, output_hidden_states=True)
    hidden = out.hidden_states[select_layer]
    # by hand: the consuming layer's pre-norm, then the projection weights
    with torch.no_grad():
        h = layers[li].layer_norm1(hidden).double()
        q = h[:, 0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = h @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    return hidden[:, 1:], got["q_cls"][0], got["keys"][0], q, k


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_oracles_on_a_tiny_tower(plus, seed):
    model = tiny_tower(seed)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    feats, q_cls, keys, q_hand, k_hand = tower_outputs(model, images)
    torch.testing.assert_close(q_cls.double(), q_hand, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(keys.double(), k_hand, atol=1e-4, rtol=1e-5)
    res = get_merger("prumerge_plus" if plus else "prumerge").merge(feats, q_cls, keys, order="official")
    scores = cls_attention(q_cls, keys)
    for b in range(3):
        s_hand = oracle_scores(q_hand[b].numpy(), k_hand[b].numpy())
        np.testing.assert_allclose(scores[b].double().numpy(), s_hand, rtol=1e-4, atol=1e-7)
        s = scores[b].double().numpy()  # the IQR oracle on the same scores (no boundary flips from rounding)
        first, extra = oracle_kept(s, plus)
        assert int(res.budget[b]) == len(first) == max(1, len(oracle_outliers(s_hand)))
        m = int(res.counts[b])
        assert res.sources[b, :m].tolist() == first + extra + [SUMMARY]
        assert (res.sources[b, m:] == -1).all()
        want = oracle_merge(feats[b].double().numpy(), keys[b, 1:].double().numpy(), s, first + extra, KNN)
        np.testing.assert_allclose(res.features[b, :m].double().numpy(), want, atol=1e-5, rtol=1e-5)
        assert not res.features[b, m:].any()


def test_budget_is_a_few_outliers_per_image():
    model = tiny_tower(0)
    feats, q_cls, keys, *_ = tower_outputs(model, torch.randn(4, 3, 28, 28))
    k = iqr_keep_count(cls_attention(q_cls, keys))
    assert ((k >= 1) & (k < feats.shape[1] // 2)).all()


def test_ascending_order_is_the_official_set_sorted():
    torch.manual_seed(3)
    f, q, k = torch.randn(2, 40, 6), torch.randn(2, 8), 3 * torch.randn(2, 41, 8)
    m = get_merger("prumerge_plus")
    off, asc = m.merge(f, q, k, order="official"), m.merge(f, q, k)
    for b in range(2):
        n = int(off.counts[b])
        assert asc.sources[b, : n - 1].tolist() == sorted(off.sources[b, : n - 1].tolist())
        assert asc.sources[b, n - 1] == SUMMARY
        rows = {int(s): r for s, r in zip(off.sources[b, :n], off.features[b, :n], strict=True)}
        for s, r in zip(asc.sources[b, :n], asc.features[b, :n], strict=True):
            torch.testing.assert_close(r, rows[int(s)])


def test_no_outlier_keeps_the_single_best_patch():
    """Equal scores (all keys equal): no outlier, K = 1, the lowest index (ties); the summary follows."""
    f = torch.randn(1, 10, 4, dtype=torch.float64)
    keys = torch.ones(1, 11, 3)
    res = get_merger("prumerge").merge(f, torch.ones(1, 3), keys)
    assert res.budget.tolist() == [1]
    assert res.sources[0].tolist() == [0, SUMMARY]


def test_one_outlier_gives_k_1():
    scores = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]])
    assert iqr_keep_count(scores).tolist() == [1]


def test_fixed_ratio_keeps_round_r_n():
    torch.manual_seed(0)
    f, q, k = torch.randn(2, 50, 4), torch.randn(2, 6), torch.randn(2, 51, 6)
    res = get_merger("prumerge").merge(f, q, k, ratio=0.1)
    assert res.budget.tolist() == [4, 4] and res.counts.tolist() == [5, 5]  # round(0.1 x 50) = 5 tokens, the summary one of them
    with pytest.raises(ValueError, match="ratio=1.5"):
        get_merger("prumerge").merge(f, q, k, ratio=1.5)


def test_summary_off_and_knn_param():
    torch.manual_seed(0)
    f, q, k = torch.randn(1, 30, 4), torch.randn(1, 6), 3 * torch.randn(1, 31, 6)
    res = get_merger("prumerge", summary=0, knn=2).merge(f, q, k, order="official")
    s = cls_attention(q, k)[0].double().numpy()
    first, _ = oracle_kept(s, False)
    assert res.sources[0].tolist() == first
    want = oracle_merge(f[0].double().numpy(), k[0, 1:].double().numpy(), s, first, 2)[:-1]
    np.testing.assert_allclose(res.features[0].double().numpy(), want, atol=1e-5)
    with pytest.raises(ValueError, match="knn=0"):
        get_merger("prumerge", knn=0)


def test_uniform_additions_sequence():
    kept = torch.zeros(1, 576, dtype=torch.bool)
    kept[0, [3, 5]] = True
    add = uniform_additions(kept, torch.tensor([32]))
    # floor(1 / (32 / 576)) = 18 (fp64), stride 6, stop 575
    assert add[0].nonzero().flatten().tolist() == list(range(0, 575, 6))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(2, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_batch_equals_alone_no_repeats_and_scale(bsz, n, seed, plus):
    g = torch.Generator().manual_seed(seed)
    f, q, k = torch.randn(bsz, n, 5, generator=g), torch.randn(bsz, 7, generator=g), 3 * torch.randn(bsz, n + 1, 7, generator=g)
    m = get_merger("prumerge_plus" if plus else "prumerge")
    whole = m.merge(f, q, k)
    scaled = m.merge(2.5 * f, q, k)
    for b in range(bsz):
        alone = m.merge(f[b:b + 1], q[b:b + 1], k[b:b + 1])
        c = int(whole.counts[b])
        assert c == int(alone.counts[0])
        assert whole.sources[b, :c].tolist() == alone.sources[0, :c].tolist()
        torch.testing.assert_close(whole.features[b, :c], alone.features[0, :c], atol=1e-5, rtol=1e-5)
        src = [s for s in whole.sources[b, :c].tolist() if s >= 0]
        assert len(set(src)) == len(src) and all(0 <= s < n for s in src)
        torch.testing.assert_close(scaled.features[b, :c], 2.5 * whole.features[b, :c], atol=1e-4, rtol=1e-5)


def test_adaptive_budget_drives_selection_methods():
    """DivPrune* / OTPrune*: select_tokens with a per-sample count tensor; batch == alone."""
    torch.manual_seed(0)
    x = torch.randn(3, 20, 8)
    counts = torch.tensor([1, 4, 7])
    for method in ("divprune", "otprune"):
        picks = otprune.select_tokens(x, counts, method)
        for b in range(3):
            alone = otprune.select_tokens(x[b], int(counts[b]), method)
            assert picks[b, : counts[b]].tolist() == alone.tolist()
            assert (picks[b, counts[b]:] == -1).all()
    with pytest.raises(ValueError, match="keep\\[0\\]=0"):
        otprune.select_tokens(x, torch.tensor([0, 1, 1]), "divprune")


def test_consuming_layer():
    assert consuming_layer(-2, 24) == 23
    assert consuming_layer(3, 24) == 3
    with pytest.raises(ValueError, match="mm_vision_select_layer=-1"):
        consuming_layer(-1, 24)


def _oracle_plus_rows(scores: np.ndarray, k: int) -> int:
    """Rows PruMerge+ uses for K attention picks: the picks and the uniform samples not among them (official rule)."""
    n = len(scores)
    first = sorted(range(n), key=lambda i: (-scores[i], i))[:k]
    stride = max(1, int(int(1 / (k / n)) / 3))
    return k + len([p for p in range(0, n - 1, stride) if p not in first])


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("ratio", [0.02, 0.05, 0.098, 0.2, 0.25, 0.5, 0.9, 0.999])
def test_fixed_ratio_hands_the_llm_at_most_round_r_n_tokens(plus, ratio):
    """N = 576: summary and PruMerge+'s samples count in the total; PruMerge+ takes the largest K that fits
    (before: PruMerge+ at r = 0.098 gave ~4rN tokens, at r >= 0.2 every patch plus the summary)."""
    g = torch.Generator().manual_seed(int(ratio * 1000))
    f, q, k = torch.randn(2, 576, 8, generator=g), torch.randn(2, 16, generator=g), 2 * torch.randn(2, 577, 16, generator=g)
    res = get_merger("prumerge_plus" if plus else "prumerge").merge(f, q, k, ratio=ratio)
    total = round(ratio * 576)
    scores = cls_attention(q, k).double().numpy()
    for b in range(2):
        m = int(res.counts[b])
        assert m <= total and int((res.sources[b] == SUMMARY).sum()) == 1
        src = res.sources[b, :m].tolist()
        assert len(set(src)) == m
        kk = int(res.budget[b])
        if plus:
            assert _oracle_plus_rows(scores[b], kk) == m - 1
            assert kk == 576 or _oracle_plus_rows(scores[b], kk + 1) > total - 1  # the largest K that fits
        else:
            assert m == total and kk == total - 1


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_ratio_1_hands_over_the_unmerged_patches(name):
    f, q, k = torch.randn(2, 50, 4), torch.randn(2, 6), torch.randn(2, 51, 6)
    res = get_merger(name).merge(f, q, k, ratio=1.0)
    assert res.counts.tolist() == [50, 50] and res.sources.tolist() == [list(range(50))] * 2  # no summary
    assert torch.equal(res.features, f)


def test_prumerge_plus_budget_too_small_is_refused():
    f, q, k = torch.randn(1, 576, 4), torch.randn(1, 6), torch.randn(1, 577, 6)
    with pytest.raises(ValueError, match="PruMerge\\+ hands the LLM at least .* more than its budget of 3"):
        get_merger("prumerge_plus").merge(f, q, k, ratio=0.005)
    assert int(get_merger("prumerge").merge(f, q, k, ratio=0.005).counts[0]) == 3


def test_crop_totals_split_an_image_budget_over_its_crops():
    from otprune.methods.prumerge import crop_totals

    assert crop_totals(0.098, [576], [1], 576) == [56]
    assert crop_totals(0.1, [2880, 576], [5, 1], 576) == [58, 58, 58, 57, 57, 58]  # round(288) over 5 crops, then 58
    assert sum(crop_totals(0.0985, [2340], [5], 576)) == round(0.0985 * 2340)
    assert crop_totals(0.9, [100], [5], 16) == [16] * 5  # (newline rows) more tokens than the crops' patches
    with pytest.raises(ValueError, match="fewer than its 5 crops"):
        crop_totals(0.001, [2880], [5], 576)
