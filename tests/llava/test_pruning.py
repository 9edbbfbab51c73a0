"""Visual-token pruning before the LLM (LAYER_INDEX=0): shapes, kept rows, config, stats."""

from __future__ import annotations

import pytest
import torch
from llava.model import llava_arch
from llava.model.llava_arch import greedy_select
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids

import otprune
from otprune import METHODS, PruneConfig
from otprune.methods.otprune import official_order


def _single(tiny, seed=1, size=(40, 30), question="Describe the image."):
    image = noise_image(seed, size)
    ids = token_ids(tiny.tokenizer, chat_prompt(question))
    return ids, pixels(tiny, [image]), [image.size]


@torch.no_grad()
def _prepared(tiny, ids, px, sizes):
    return tiny.model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, None, px, sizes)


@torch.no_grad()
def test_env_pruning_keeps_text_plus_k_and_the_selected_rows(tiny_v15, monkeypatch):
    monkeypatch.setenv("BASELINE", "OURS")
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    model = tiny_v15.model
    ids, px, sizes = _single(tiny_v15)
    _, _, _, _, embeds, _ = _prepared(tiny_v15, ids, px, sizes)
    text = ids.numel() - 1
    k = round(0.25 * 16)
    assert embeds.shape[1] == text + k
    feats = model.encode_images(px)[0]  # (16, D)
    keep = otprune.select_tokens(feats, 0.25)
    (start, end), = model.visual_layout.spans[0]
    torch.testing.assert_close(embeds[0, start:end], feats[keep])
    assert torch.equal(model.visual_layout.kept_indices[0], keep)
    # text rows are the embeddings of the text tokens, in order
    embed = model.get_model().embed_tokens.weight
    text_ids = ids[ids != -200]
    rows = torch.cat([embeds[0, :start], embeds[0, end:]])
    torch.testing.assert_close(rows, embed[text_ids])
    logits = model(input_ids=ids[None], images=px).logits
    assert logits.shape[1] == text + k
    (stats,) = model.pruning_stats
    assert stats["method"] == "otprune" and stats["layer"] == 0 and stats["ratio"] == 0.25
    assert (stats["visual_tokens_before"], stats["visual_tokens_after"]) == (16, k)
    assert (stats["seq_len_before"], stats["seq_len_after"], stats["text_tokens"]) == (text + 16, text + k, text)
    assert stats["select_ms"] >= 0 and stats["prefill_ms"] > 0


@torch.no_grad()
def test_v16_prunes_the_whole_anyres_set_jointly(tiny_v16):
    """60x20: 16 base + 2 x (8 + newline) = 34 tokens; K = round(0.25 * 34) = round(8.5) = 8."""
    model = tiny_v16.model
    model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    ids, px, sizes = _single(tiny_v16, size=(60, 20))
    _, _, _, _, embeds, _ = _prepared(tiny_v16, ids, px, sizes)
    feats = model.image_features(px, sizes)[0]
    assert feats.shape[0] == 34
    keep = otprune.select_tokens(feats, 0.25)
    assert keep.numel() == 8
    (start, end), = model.visual_layout.spans[0]
    torch.testing.assert_close(embeds[0, start:end], feats[keep])
    assert embeds.shape[1] == ids.numel() - 1 + 8


@torch.no_grad()
def test_ratio_one_keeps_everything_and_matches_no_pruning(tiny_v15):
    model = tiny_v15.model
    ids, px, _ = _single(tiny_v15, seed=7)
    plain = model(input_ids=ids[None], images=px).logits
    for ratio in (1.0, 1):  # the int 1 is a ratio too, not a count
        model.set_pruning(PruneConfig(layer=0, ratio=ratio))
        full = model(input_ids=ids[None], images=px).logits
        torch.testing.assert_close(full, plain, atol=1e-6, rtol=0)


@torch.no_grad()
def test_text_only_batch_with_an_empty_image_list(tiny_v15):
    tiny_v15.model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    ids = token_ids(tiny_v15.tokenizer, chat_prompt("Hello there.", n_images=0))[None]
    with_list = tiny_v15.model(input_ids=ids, images=[]).logits
    plain = tiny_v15.model(input_ids=ids).logits
    torch.testing.assert_close(with_list, plain, atol=1e-6, rtol=0)


@torch.no_grad()
def test_official_order_reproduces_the_set_order(tiny_v15):
    model = tiny_v15.model
    model.set_pruning(PruneConfig(layer=0, ratio=0.5, order="official"))
    ids, px, sizes = _single(tiny_v15, seed=8)
    _, _, _, _, embeds, _ = _prepared(tiny_v15, ids, px, sizes)
    feats = model.encode_images(px)[0]
    picks = otprune.select_tokens(feats, 0.5, order="greedy").tolist()
    expected = official_order(picks)
    assert model.visual_layout.kept_indices[0].tolist() == expected
    (start, end), = model.visual_layout.spans[0]
    torch.testing.assert_close(embeds[0, start:end], feats[expected])
    assert model.pruning_stats[0]["order"] == "official"


# CDPruner needs the CLIP text tower, which the tiny checkpoint's tower lacks: tests/llava/test_llava_cdpruner.py
@pytest.mark.parametrize("method", [m for m in METHODS if not getattr(METHODS[m], "needs_instruction", False)])
@torch.no_grad()
def test_every_registered_method_runs_through_the_model(tiny_v15, method):
    model = tiny_v15.model
    model.set_pruning(PruneConfig(method=method, layer=0, ratio=0.3))
    images = [noise_image(10), noise_image(11, (20, 40))]
    ids = token_ids(tiny_v15.tokenizer, chat_prompt("Compare them.", n_images=2))
    px = pixels(tiny_v15, images)
    config = model.pruning_config()
    _, _, _, _, embeds, _ = _prepared(tiny_v15, ids, px, None)
    k = round(0.3 * 16)
    assert embeds.shape[1] == ids.numel() - 2 + 2 * k
    feats = model.encode_images(px)
    for i, (start, end) in enumerate(model.visual_layout.spans[0]):
        keep = otprune.select_tokens(feats[i], 0.3, method, **config.method_params())
        torch.testing.assert_close(embeds[0, start:end], feats[i][keep])
    assert model(input_ids=ids[None], images=px).logits.shape[1] == embeds.shape[1]


@torch.no_grad()
def test_all_images_of_a_batch_in_one_selection_call(tiny_v16, monkeypatch):
    """Images of different token counts go through ONE padded call with their lengths."""
    calls = []
    real = otprune.select_tokens

    def spy(features, keep, method="otprune", **kwargs):
        calls.append((tuple(features.shape), kwargs.get("lengths")))
        return real(features, keep, method, **kwargs)

    monkeypatch.setattr(otprune, "select_tokens", spy)
    model = tiny_v16.model
    model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    images = [noise_image(1, (60, 20)), noise_image(2, (20, 60)), noise_image(3, (32, 32))]
    px = pixels(tiny_v16, images)
    seqs = [token_ids(tiny_v16.tokenizer, chat_prompt("One.", n_images=1)), token_ids(tiny_v16.tokenizer, chat_prompt("Two.", n_images=2))]
    from llava_test_utils import pad_batch

    ids, mask = pad_batch(seqs, "right", 0)
    model(input_ids=ids, attention_mask=mask, images=px, image_sizes=[im.size for im in images])
    assert len(calls) == 1
    shape, lengths = calls[0]
    assert shape[:2] == (3, 40) and lengths.tolist() == [34, 40, 36]
    assert [s["visual_tokens_after"] for s in model.pruning_stats] == [round(0.25 * 34), round(0.25 * 40) + round(0.25 * 36)]


@torch.no_grad()
def test_pruning_off_does_no_selection_work(tiny_v15, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("selection ran with pruning off")

    monkeypatch.setattr(otprune, "select_tokens", boom)
    monkeypatch.setattr(llava_arch.LlavaMetaForCausalLM, "select_visual_tokens", boom)
    ids, px, _ = _single(tiny_v15)
    out = tiny_v15.model(input_ids=ids[None], images=px)
    assert out.logits.shape[1] == ids.numel() - 1 + 16
    (stats,) = tiny_v15.model.pruning_stats
    assert stats["method"] is None and stats["select_ms"] == 0.0 and stats["visual_tokens_after"] == 16


def test_set_pruning_overrides_the_environment_until_reset(tiny_v15, monkeypatch):
    model = tiny_v15.model
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "0.5")
    assert model.pruning_config().ratio == 0.5
    model.set_pruning(PruneConfig())  # off, whatever the environment says
    assert not model.pruning_config().enabled
    model.set_pruning(PruneConfig(method="divprune", layer=0, ratio=0.1))
    assert model.pruning_config().method == "divprune"
    model.set_pruning(None)
    assert model.pruning_config() == PruneConfig.from_env()
    with pytest.raises(ValueError, match="PruneConfig"):
        model.set_pruning({"layer": 0})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"LAYER_INDEX": "2", "SUBSET_RATIO": "0.5"}, "LAYER_INDEX=2: the model has 2 decoder layers"),
        ({"LAYER_INDEX": "zero", "SUBSET_RATIO": "0.5"}, "LAYER_INDEX"),
        ({"LAYER_INDEX": "0", "SUBSET_RATIO": "1.5"}, "SUBSET_RATIO"),
        ({"LAYER_INDEX": "0"}, "SUBSET_RATIO"),
        ({"LAYER_INDEX": "0", "SUBSET_RATIO": "0.5", "BASELINE": "nope"}, "BASELINE"),
        ({"LAYER_INDEX": "0", "SUBSET_RATIO": "0.5", "OTPRUNE_ORDER": "hash"}, "OTPRUNE_ORDER"),
    ],
)
@torch.no_grad()
def test_bad_environment_fails_at_the_first_forward(tiny_v15, monkeypatch, env, match):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ids, px, _ = _single(tiny_v15)
    with pytest.raises(ValueError, match=match):
        tiny_v15.model(input_ids=ids[None], images=px)
    with pytest.raises(ValueError, match=match):
        tiny_v15.model.generate(ids[None], images=px, max_new_tokens=2)


@torch.no_grad()
def test_hook_runs_once_per_prefill_with_timing(tiny_v15, monkeypatch):
    model = tiny_v15.model
    seen = []
    monkeypatch.setattr(model, "on_pruning_stats", lambda stats: seen.append([dict(s) for s in stats]), raising=False)
    model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    ids, px, _ = _single(tiny_v15)
    model(input_ids=ids[None], images=px)
    assert len(seen) == 1 and seen[0][0]["prefill_ms"] > 0 and seen[0][0]["select_ms"] >= 0
    model.generate(ids[None], images=px, max_new_tokens=3, do_sample=False)
    assert len(seen) == 2 and seen[1][0]["prefill_ms"] > 0 and seen[1][0]["visual_tokens_after"] == 4
    model.set_pruning(PruneConfig())
    model.generate(ids[None], images=px, max_new_tokens=3, do_sample=False)
    assert len(seen) == 3 and seen[2][0]["prefill_ms"] > 0 and seen[2][0]["method"] is None
    assert model.pruning_stats == seen[2]


def test_thin_entry_points(tiny_v15):
    feats = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_select(feats, 0.25), otprune.select_tokens(feats, 0.25, "otprune"))
    assert torch.equal(greedy_select(feats, 5, gamma=0.05), otprune.select_tokens(feats, 5, gamma=0.05))
    tiny_v15.model.set_pruning(PruneConfig(layer=0, ratio=0.5, gamma=0.05))
    kept = tiny_v15.model.OTPrune(feats)
    torch.testing.assert_close(kept, feats[otprune.select_tokens(feats, 0.5, gamma=0.05)])


def test_pruned_forward_with_autograd_on(tiny_v15):
    # A plain forward (no torch.no_grad, as in training or users' scripts): selection detaches,
    # gradients still reach the kept visual tokens' projector.
    model = tiny_v15.model
    model.set_pruning(PruneConfig(method="otprune", layer=0, ratio=0.25))
    try:
        ids, px, sizes = _single(tiny_v15)
        with torch.enable_grad():
            logits = model(input_ids=ids[None], images=px).logits
            logits.float().sum().backward()
        assert logits.shape[1] == ids.numel() - 1 + 4
        assert any(p.grad is not None for p in model.get_model().mm_projector.parameters())
    finally:
        model.set_pruning(None)
        model.zero_grad(set_to_none=True)
