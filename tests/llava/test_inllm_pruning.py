"""Pruning inside the LLM (`LAYER_INDEX = L > 0`) with the feature-selection methods."""

from __future__ import annotations

import pytest
import torch
from inllm_utils import greedy_without_cache, single
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids

import otprune
from otprune import PruneConfig

# Tiny matrices: one thread is faster and immune to other processes on the cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _run(model, config, ids, px, sizes, **kwargs):
    model.set_pruning(config)
    return model(input_ids=ids[None], images=px, image_sizes=sizes, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("method", ["otprune", "divprune", "random", "fastv"])
@pytest.mark.parametrize("layer", [1, 3])
def test_ratio_one_is_identical_to_unpruned(tiny_deep, method, layer):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    ref = _run(model, PruneConfig(), ids, px, sizes)
    out = _run(model, PruneConfig(method=method, layer=layer, ratio=1.0), ids, px, sizes)
    assert torch.equal(out.logits, ref.logits)
    assert model.pruned_layout is not None and model.pruned_layout.stages[-1].layer == layer
    gen_ref = model.generate(ids[None], images=px, image_sizes=sizes, max_new_tokens=6, do_sample=False)
    model.set_pruning(PruneConfig(method=method, layer=layer, ratio=1.0))
    gen = model.generate(ids[None], images=px, image_sizes=sizes, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen_ref)


@torch.no_grad()
def test_layer_two_keeps_prefix_hidden_states_and_selects_on_layer_l(tiny_deep):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    ref = _run(model, PruneConfig(), ids, px, sizes, output_hidden_states=True)
    (start, end), = model.visual_layout.spans[0]
    n, v, layer, ratio = ref.logits.shape[1], end - start, 2, 0.25
    k = round(ratio * v)
    out = _run(model, PruneConfig(method="otprune", layer=layer, ratio=ratio), ids, px, sizes, output_hidden_states=True)
    # hidden_states[i] is the input of layer i (the last one is the normed output)
    for i in range(layer + 1):
        assert torch.equal(out.hidden_states[i], ref.hidden_states[i]), i
    assert [h.shape[1] for h in out.hidden_states[layer + 1 :]] == [n - v + k] * (len(out.hidden_states) - layer - 1)
    assert out.logits.shape[1] == n and int(model.pruned_layout.output_rows().sum()) == n - v + k
    # the kept tokens: OTPrune on the layer-L input hidden states of the image
    keep = otprune.select_tokens(ref.hidden_states[layer][0, start:end], ratio)
    rows = torch.cat([torch.arange(start), keep + start, torch.arange(end, n)])
    stage = model.pruned_layout.stages[-1]
    assert stage.layer == layer and torch.equal(stage.source[0], rows)
    stats = model.pruning_stats[0]
    assert stats["tokens_per_layer"] == [n, n, n - v + k, n - v + k]
    assert stats["visual_tokens_per_layer"] == [v, v, k, k]
    assert (stats["layer"], stats["visual_tokens_after"], stats["seq_len_after"]) == (layer, k, n - v + k)


@torch.no_grad()
def test_layers_from_l_see_the_kept_rows_at_their_original_positions(tiny_deep):
    """Reference: gather the kept rows of the unpruned layer-L input and run layers L.. on them by hand."""
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=4)
    layer = 1
    ref = _run(model, PruneConfig(), ids, px, sizes, output_hidden_states=True)
    out = _run(model, PruneConfig(method="divprune", layer=layer, ratio=0.5), ids, px, sizes)
    rows = model.pruned_layout.stages[-1].source[0]
    decoder = model.get_model()
    hidden = ref.hidden_states[layer][:, rows]
    positions = rows[None]  # the original positions
    cos, sin = decoder.rotary_emb(hidden, positions)
    for block in decoder.layers[layer:]:
        hidden = block(hidden, attention_mask=None, position_embeddings=(cos, sin))
    logits = model.lm_head(decoder.norm(hidden))
    torch.testing.assert_close(out.logits[:, rows], logits, rtol=1e-5, atol=1e-5)
    # with positions renumbered 0..n'-1 the result would differ: positions matter
    cos2, sin2 = decoder.rotary_emb(hidden, torch.arange(rows.numel())[None])
    other = ref.hidden_states[layer][:, rows]
    for block in decoder.layers[layer:]:
        other = block(other, attention_mask=None, position_embeddings=(cos2, sin2))
    assert not torch.allclose(model.lm_head(decoder.norm(other)), out.logits[:, rows], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("config", [PruneConfig(method="otprune", layer=2, ratio=0.25), PruneConfig(method="vtw", layer=1)])
def test_generation_with_and_without_kv_cache_agree(tiny_deep, config):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=5, question="What is in the picture?")
    model.set_pruning(config)
    cached = model.generate(ids[None], images=px, image_sizes=sizes, max_new_tokens=6, do_sample=False)
    assert cached[0].tolist() == greedy_without_cache(model, ids, px, sizes, 6)
    model.set_pruning(PruneConfig())
    assert cached[0].tolist() != model.generate(ids[None], images=px, image_sizes=sizes, max_new_tokens=6,
                                                 do_sample=False)[0].tolist()


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config", [PruneConfig(method="otprune", layer=2, ratio=0.25), PruneConfig(method="fastv", layer=2, ratio=0.5),
                                    PruneConfig(method="vtw", layer=3)])
def test_batch_equals_each_sample_alone(tiny_deep, side, config):
    model = tiny_deep.model
    questions = ["Describe the image.", "What is in the picture? Answer with one word.", "Where is the dog?"]
    images = [noise_image(11), noise_image(12, (20, 60)), noise_image(13, (64, 64))]
    seqs = [token_ids(tiny_deep.tokenizer, chat_prompt(q)) for q in questions]
    ids, mask = pad_batch(seqs, side, 0)
    px = pixels(tiny_deep, images)
    model.set_pruning(config)
    batch = model.generate(ids, attention_mask=mask, images=px, max_new_tokens=5, do_sample=False)
    logits = model(input_ids=ids, attention_mask=mask, images=px).logits
    rows = model.pruned_layout.output_rows()
    for b, (seq, image) in enumerate(zip(seqs, images, strict=True)):
        alone = model.generate(seq[None], images=pixels(tiny_deep, [image]), max_new_tokens=5, do_sample=False)
        assert torch.equal(batch[b], alone[0]), b
        alone_logits = model(input_ids=seq[None], images=pixels(tiny_deep, [image])).logits[0]
        alone_rows = model.pruned_layout.output_rows()[0]
        torch.testing.assert_close(logits[b][rows[b]], alone_logits[alone_rows], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_v16_images_of_different_sizes_keep_different_counts(tiny_v16):
    """LLaVA-1.6 (2 layers): LAYER_INDEX=1; samples keep different counts and are re-padded."""
    model = tiny_v16.model
    images = [noise_image(21, (60, 20)), noise_image(22, (30, 30))]
    seqs = [token_ids(tiny_v16.tokenizer, chat_prompt(q)) for q in ("Describe the image.", "What is shown?")]
    ids, mask = pad_batch(seqs, "right", 0)
    px = pixels(tiny_v16, images)
    sizes = [im.size for im in images]
    model.set_pruning(PruneConfig(method="otprune", layer=1, ratio=0.3))
    logits = model(input_ids=ids, attention_mask=mask, images=px, image_sizes=sizes).logits
    stats = model.pruning_stats
    before = [s["visual_tokens_before"] for s in stats]
    kept = [round(0.3 * n) for n in before]
    assert before[0] != before[1] and [s["visual_tokens_per_layer"] for s in stats] == [[n, k] for n, k in
                                                                                          zip(before, kept, strict=True)]
    final = model.pruned_layout.stages[-1]
    assert final.valid.sum(1).tolist() == [s["text_tokens"] + k for s, k in zip(stats, kept, strict=True)]
    rows = model.pruned_layout.output_rows()
    for b in range(2):
        alone = model(input_ids=seqs[b][None], images=pixels(tiny_v16, [images[b]]), image_sizes=[sizes[b]]).logits[0]
        alone_rows = model.pruned_layout.output_rows()[0]
        torch.testing.assert_close(logits[b][rows[b]], alone[alone_rows], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_loss_uses_the_labels_of_the_kept_rows(tiny_deep):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    labels = ids.clone().masked_fill(ids < 0, -100)[None]
    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], images=px, labels=labels)
    model.set_pruning(PruneConfig(method="otprune", layer=2, ratio=1.0))
    same = model(input_ids=ids[None], images=px, labels=labels)
    torch.testing.assert_close(same.loss, ref.loss)
    model.set_pruning(PruneConfig(method="otprune", layer=2, ratio=0.25))
    out = model(input_ids=ids[None], images=px, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape == ref.logits.shape
    assert int(model.pruned_layout.output_rows().sum()) < ref.logits.shape[1]


@torch.no_grad()
def test_stats_schedule_for_every_mode(tiny_deep):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    _run(model, PruneConfig(), ids, px, sizes)
    off = model.pruning_stats[0]
    n, v = off["seq_len_before"], off["visual_tokens_before"]
    assert off["tokens_per_layer"] == [n] * 4 and off["visual_tokens_per_layer"] == [v] * 4 and off["recipe"] is None
    _run(model, PruneConfig(method="uniform", layer=0, ratio=0.5), ids, px, sizes)
    assert model.pruning_stats[0]["tokens_per_layer"] == [n - v // 2] * 4 and model.pruned_layout is None


def test_output_hidden_states_twice_gives_the_same_model(tiny_deep):
    """Regression: capture hooks must not be installed twice on the CLIP tower (it would shift its layers)."""
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    first = _run(model, PruneConfig(), ids, px, sizes, output_hidden_states=True)
    second = _run(model, PruneConfig(), ids, px, sizes, output_hidden_states=True)
    assert torch.equal(first.logits, second.logits)
    assert all(torch.equal(a, b) for a, b in zip(first.hidden_states, second.hidden_states, strict=True))


def test_layer_beyond_the_model_is_refused(tiny_deep, monkeypatch):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    monkeypatch.setenv("LAYER_INDEX", "4")
    monkeypatch.setenv("SUBSET_RATIO", "0.5")
    with pytest.raises(ValueError, match=r"LAYER_INDEX=4: the model has 4 decoder layers; use 0 .* to 3"):
        model(input_ids=ids[None], images=px)
    monkeypatch.setenv("LAYER_INDEX", "3")
    monkeypatch.setenv("OTPRUNE_ORDER", "official")
    with pytest.raises(ValueError, match=r"order='official' \(OTPRUNE_ORDER\).*layer 0"):
        model(input_ids=ids[None], images=px)


@torch.no_grad()
def test_beam_search_keeps_the_stage_masks_in_step(tiny_deep):
    """Beams repeat and reorder the cache: the per-stage padding masks must follow."""
    model = tiny_deep.model
    seqs = [token_ids(tiny_deep.tokenizer, chat_prompt(q)) for q in ("Describe the image.", "What is it? Tell me more.")]
    images = [noise_image(61), noise_image(62, (24, 48))]
    ids, mask = pad_batch(seqs, "left", 0)
    model.set_pruning(PruneConfig(method="otprune", layer=2, ratio=0.25))
    batch = model.generate(ids, attention_mask=mask, images=pixels(tiny_deep, images), max_new_tokens=4, num_beams=3,
                           do_sample=False)
    for b in range(2):
        alone = model.generate(seqs[b][None], images=pixels(tiny_deep, [images[b]]), max_new_tokens=4, num_beams=3,
                               do_sample=False)
        assert torch.equal(batch[b], alone[0]), b
