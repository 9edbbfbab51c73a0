"""PruMerge / PruMerge+ and the adaptive budgets (DivPrune*, OTPrune*) in our llava, against the
numpy oracles on the tiny checkpoints' own tower (q / k by hand from its weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids
from oracles import prumerge_kept, prumerge_merge, prumerge_outliers, prumerge_scores

import otprune
from otprune.methods.prumerge import SUMMARY, consuming_layer, encoder_layers


def _hand_qk(model, px):
    """(patch features (P, N, C), q_cls (P, C), keys (P, 1 + N, C)) in fp64, from the tower's weights."""
    tower = model.get_vision_tower()
    clip = tower.vision_tower
    with torch.no_grad():
        out = clip(px.to(tower.dtype), output_hidden_states=True)
        layers = encoder_layers(clip)
        layer = layers[consuming_layer(tower.select_layer, len(layers))]
        hidden = out.hidden_states[tower.select_layer]
        h = layer.layer_norm1(hidden).double()
        attn = layer.self_attn
        q = h[:, 0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = h @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    return hidden[:, 1:].double(), q, k


def _sharpen(model):
    """Sharper CLS attention than the random init's, so that IQR outliers exist."""
    clip = model.get_vision_tower().vision_tower
    with torch.no_grad():
        for layer in encoder_layers(clip):
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)


def _batch(tiny, seeds, sizes=((40, 30), (30, 44), (50, 50))):
    images = [noise_image(s, sizes[i % len(sizes)]) for i, s in enumerate(seeds)]
    ids = [token_ids(tiny.tokenizer, chat_prompt("Describe the image.")) for _ in images]
    return ids, pixels(tiny, images), [im.size for im in images]


@pytest.fixture
def sharp_v15(tiny_v15):
    clip = tiny_v15.model.get_vision_tower().vision_tower
    saved = {k: v.clone() for k, v in clip.state_dict().items()}
    _sharpen(tiny_v15.model)
    yield tiny_v15
    clip.load_state_dict(saved)


@pytest.mark.parametrize("method, plus", [("PRUMERGE", False), ("PRUMERGE_PLUS", True)])
@torch.no_grad()
def test_prumerge_matches_the_oracle(sharp_v15, monkeypatch, method, plus):
    monkeypatch.setenv("BASELINE", method)
    model = sharp_v15.model
    ids, px, sizes = _batch(sharp_v15, [1, 2, 3])
    embeds = []
    for i in range(3):  # each image alone ...
        out = model.prepare_inputs_labels_for_multimodal(ids[i][None], None, None, None, None, px[i:i + 1], sizes[i:i + 1])
        (span,) = model.visual_layout.spans[0]
        embeds.append((out[4][0, span[0]:span[1]], model.visual_layout.kept_indices[0]))
        assert model.pruning_stats[0]["image_tokens_after"] == [span[1] - span[0]]
    feats, q, k = _hand_qk(model, px)
    projector = model.get_model().mm_projector
    for i in range(3):
        s = prumerge_scores(q[i].numpy(), k[i].numpy())
        first, extra = prumerge_kept(s, plus)
        assert len(first) == max(1, len(prumerge_outliers(s)))
        got, sources = embeds[i]
        assert sources.tolist() == sorted(first + extra) + [SUMMARY]
        rows = prumerge_merge(feats[i].numpy(), k[i, 1:].numpy(), s, sorted(first + extra), 32)
        want = projector(torch.from_numpy(rows).float())
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # ... and the batch of three gives each the same tokens
    from llava_test_utils import pad_batch
    batch_ids, mask = pad_batch(ids, "right", 0)
    out = model.prepare_inputs_labels_for_multimodal(batch_ids, None, mask, None, None, px, sizes)
    for i in range(3):
        (span,) = model.visual_layout.spans[i]
        torch.testing.assert_close(out[4][i, span[0]:span[1]], embeds[i][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["DIVPRUNE", "OURS"])
@torch.no_grad()
def test_adaptive_budget_selects_the_iqr_count(sharp_v15, monkeypatch, method):
    monkeypatch.setenv("BASELINE", method)
    monkeypatch.setenv("SUBSET_RATIO", "iqr")
    model = sharp_v15.model
    ids, px, sizes = _batch(sharp_v15, [4, 5])
    from llava_test_utils import pad_batch
    batch_ids, mask = pad_batch(ids, "left", 0)
    out = model.prepare_inputs_labels_for_multimodal(batch_ids, None, mask, None, None, px, sizes)
    feats, q, k = _hand_qk(model, px)
    projected = model.encode_images(px)
    counts = []
    for i in range(2):
        kk = max(1, len(prumerge_outliers(prumerge_scores(q[i].numpy(), k[i].numpy()))))
        counts.append(kk)
        keep = otprune.select_tokens(projected[i], kk, method)
        (span,) = model.visual_layout.spans[i]
        assert span[1] - span[0] == kk
        assert model.visual_layout.kept_indices[i].tolist() == keep.tolist()
        torch.testing.assert_close(out[4][i, span[0]:span[1]], projected[i][keep])
    assert [s["image_tokens_after"] for s in model.pruning_stats] == [[c] for c in counts]
    assert model.pruning_stats[0]["ratio"] == "iqr"


@torch.no_grad()
def test_v16_merges_each_crop(tiny_v16, monkeypatch):
    monkeypatch.setenv("BASELINE", "PRUMERGE")
    model = tiny_v16.model
    ids, px, sizes = _batch(tiny_v16, [6], sizes=((60, 30),))
    model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, sizes)
    feats, q, k = _hand_qk(model, px[0] if isinstance(px, list) else px.flatten(0, 1) if px.ndim == 5 else px)
    n = feats.shape[1]
    want = []
    for c in range(feats.shape[0]):
        s = prumerge_scores(q[c].numpy(), k[c].numpy())
        first, _ = prumerge_kept(s, False)
        want += [c * n + p for p in sorted(first)] + [SUMMARY]
    assert model.visual_layout.kept_indices[0].tolist() == want
    (span,) = model.visual_layout.spans[0]
    assert span[1] - span[0] == len(want)


def test_bad_switches_refuse(tiny_v15, monkeypatch):
    monkeypatch.setenv("BASELINE", "PRUMERGE")
    monkeypatch.setenv("LAYER_INDEX", "2")
    with pytest.raises(ValueError, match="LAYER_INDEX=2"):
        otprune.PruneConfig.from_env()
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "adaptive")
    with pytest.raises(ValueError, match="SUBSET_RATIO='adaptive'.*'iqr'"):
        otprune.PruneConfig.from_env()


def test_fixed_ratio_prumerge(tiny_v15, monkeypatch):
    monkeypatch.setenv("BASELINE", "PRUMERGE")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    model = tiny_v15.model
    ids, px, sizes = _batch(tiny_v15, [7])
    with torch.no_grad():
        model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, sizes)
    assert len(model.visual_layout.kept_indices[0]) == round(0.25 * 16)  # 3 patches and the summary
    assert np.isclose(model.pruning_stats[0]["image_tokens_after"][0], 4)


@pytest.mark.parametrize("method", ["PRUMERGE", "PRUMERGE_PLUS"])
@pytest.mark.parametrize("ratio", ["0.25", "0.5", "0.9"])  # PruMerge+ at 0.25: refused (N = 16)
@torch.no_grad()
def test_fixed_ratio_hands_the_llm_at_most_round_r_t(tiny_v15, tiny_v16, monkeypatch, method, ratio):
    """Summary and PruMerge+'s samples included, an image's tokens are at most round(r * T) (before:
    PruMerge+ at r = 0.25 kept every patch plus the summary); LLaVA-1.6: T = crops x N, the records' count."""
    monkeypatch.setenv("BASELINE", method)
    monkeypatch.setenv("SUBSET_RATIO", ratio)
    for tiny, sizes in ((tiny_v15, ((40, 30),)), (tiny_v16, ((60, 30),))):
        ids, px, image_sizes = _batch(tiny, [3], sizes=sizes)
        if method == "PRUMERGE_PLUS" and ratio == "0.25":  # 1 pick + 3 samples + the summary > round(0.25 x 16)
            with pytest.raises(ValueError, match="PruMerge\\+ hands the LLM at least 5 tokens .* budget of 4"):
                tiny.model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, image_sizes)
            continue
        tiny.model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, image_sizes)
        stats = tiny.model.pruning_stats[0]
        (before,), (after,) = stats["image_tokens_before"], stats["image_tokens_after"]
        assert after <= round(float(ratio) * before) and after == len(tiny.model.visual_layout.kept_indices[0])


@pytest.mark.parametrize("method", ["PRUMERGE", "PRUMERGE_PLUS"])
@torch.no_grad()
def test_ratio_1_is_the_unpruned_model(tiny_v15, tiny_v16, monkeypatch, method):
    """SUBSET_RATIO=1: the LLM's input is exactly the unpruned model's (before: T + 1 tokens, an all-zero summary)."""
    for tiny, sizes in ((tiny_v15, ((40, 30),)), (tiny_v16, ((60, 30),))):
        ids, px, image_sizes = _batch(tiny, [4], sizes=sizes)
        monkeypatch.delenv("BASELINE", raising=False)
        monkeypatch.delenv("SUBSET_RATIO", raising=False)
        want = tiny.model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, image_sizes)[4]
        monkeypatch.setenv("BASELINE", method)
        monkeypatch.setenv("SUBSET_RATIO", "1")
        got = tiny.model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, image_sizes)[4]
        assert torch.equal(got, want)
        stats = tiny.model.pruning_stats[0]
        assert stats["image_tokens_after"] == stats["image_tokens_before"] and stats["method"] == method.lower()
