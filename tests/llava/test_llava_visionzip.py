"""VisionZip in our llava, against the numpy oracle on the tiny checkpoints' own tower: q / k of the
layer PRODUCING the selected hidden state computed by hand from its weights."""

from __future__ import annotations

import pytest
import torch
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids
from oracles_baselines import visionzip_oracle

import otprune
from otprune.methods.prumerge import encoder_layers
from otprune.methods.visionzip import CLS, producing_layer, split_budget


def _hand(model, px):
    """(hidden with CLS (P, 1 + N, C), q_cls (P, C), keys (P, 1 + N, C), heads) in fp64, by hand."""
    tower = model.get_vision_tower()
    clip = tower.vision_tower
    with torch.no_grad():
        out = clip(px.to(tower.dtype), output_hidden_states=True)
        layers = encoder_layers(clip)
        index = producing_layer(tower.select_layer, len(layers))
        layer = layers[index]
        h = layer.layer_norm1(out.hidden_states[index]).double()  # the producing layer's input
        attn = layer.self_attn
        q = h[:, 0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = h @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    return out.hidden_states[tower.select_layer].double(), q, k, clip.config.num_attention_heads


def _batch(tiny, seeds, sizes=((40, 30), (30, 44), (50, 50))):
    images = [noise_image(s, sizes[i % len(sizes)]) for i, s in enumerate(seeds)]
    ids = [token_ids(tiny.tokenizer, chat_prompt("Describe the image.")) for _ in images]
    return ids, pixels(tiny, images), [im.size for im in images]


@torch.no_grad()
def test_visionzip_matches_the_oracle_and_batch_equals_alone(tiny_v15, monkeypatch):
    monkeypatch.setenv("BASELINE", "VISIONZIP")
    monkeypatch.setenv("SUBSET_RATIO", "0.5")
    model = tiny_v15.model
    ids, px, sizes = _batch(tiny_v15, [1, 2, 3])
    hidden, q, k, heads = _hand(model, px)
    n = hidden.shape[1] - 1
    budget = round(0.5 * n)
    dominant, ctx = split_budget(budget, 10 / 64)
    projector = model.get_model().mm_projector
    alone = []
    for i in range(3):
        out = model.prepare_inputs_labels_for_multimodal(ids[i][None], None, None, None, None, px[i:i + 1], sizes[i:i + 1])
        (span,) = model.visual_layout.spans[0]
        tokens, sources = visionzip_oracle(hidden[i].numpy(), q[i].numpy(), k[i].numpy(), heads, dominant, ctx)
        assert model.visual_layout.kept_indices[0].tolist() == [CLS if s == -3 else s for s in sources]
        want = projector(torch.from_numpy(tokens).float())
        torch.testing.assert_close(out[4][0, span[0]:span[1]], want, atol=1e-4, rtol=1e-4)
        assert model.pruning_stats[0]["image_tokens_after"] == [budget]
        alone.append(out[4][0, span[0]:span[1]])
    batch_ids, mask = pad_batch(ids, "left", 0)
    out = model.prepare_inputs_labels_for_multimodal(batch_ids, None, mask, None, None, px, sizes)
    for i in range(3):
        (span,) = model.visual_layout.spans[i]
        torch.testing.assert_close(out[4][i, span[0]:span[1]], alone[i], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_v16_merges_each_crop_and_generates(tiny_v16, monkeypatch):
    monkeypatch.setenv("BASELINE", "VISIONZIP")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    model = tiny_v16.model
    ids, px, sizes = _batch(tiny_v16, [6], sizes=((60, 30),))
    model.prepare_inputs_labels_for_multimodal(ids[0][None], None, None, None, None, px, sizes)
    crops = px[0] if isinstance(px, list) else px.flatten(0, 1) if px.ndim == 5 else px
    n = model.get_vision_tower().num_patches_per_side ** 2
    per_crop = round(0.25 * n)
    (span,) = model.visual_layout.spans[0]
    assert span[1] - span[0] == crops.shape[0] * per_crop
    kept = model.visual_layout.kept_indices[0].tolist()
    assert kept.count(CLS) == crops.shape[0]  # one CLS row per crop


def test_switches_refuse(monkeypatch):
    with pytest.raises(ValueError, match="SUBSET_RATIO"):
        otprune.PruneConfig.from_env({"BASELINE": "VISIONZIP"})
    with pytest.raises(ValueError, match="LAYER_INDEX=2"):
        otprune.PruneConfig.from_env({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "2"})
    with pytest.raises(ValueError, match="produced by none"):
        producing_layer(0, 24)
    assert producing_layer(-2, 24) == 22  # the official layers[-2] / attentions[-2] of CLIP-L
