"""Batches: every sample's kept tokens, logits, labels and greedy generation equal running it alone."""

from __future__ import annotations

import pytest
import torch
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids, valid_rows

from otprune import PruneConfig

ATOL = 1e-4


def _samples(tiny):
    """Three different prompts: one image; text before two images; no image at all."""
    return [
        (chat_prompt("What is in the picture?"), [noise_image(21, (40, 30))]),
        (chat_prompt("Compare the two images in detail.", n_images=2, before="First look carefully. "), [noise_image(22, (60, 20)), noise_image(23, (20, 60))]),
        (chat_prompt("How many objects are there?", n_images=0), []),
    ]


def _alone(tiny, prompt, images, **generate):
    ids = token_ids(tiny.tokenizer, prompt)[None]
    px = pixels(tiny, images) if images else None
    sizes = [im.size for im in images] or None
    out = tiny.model(input_ids=ids, images=px, image_sizes=sizes)
    kept = tiny.model.visual_layout.kept_indices if images else None
    gen = tiny.model.generate(ids, images=px, image_sizes=sizes, **generate)
    return out.logits[0], kept, gen[0]


@pytest.mark.parametrize("version", ["v15", "v16"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batch_equals_each_sample_alone(version, side, request):
    tiny = request.getfixturevalue(f"tiny_{version}")
    model = tiny.model
    model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    samples = _samples(tiny)
    generate = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    alone = [_alone(tiny, prompt, images, **generate) for prompt, images in samples]

    seqs = [token_ids(tiny.tokenizer, prompt) for prompt, _ in samples]
    ids, mask = pad_batch(seqs, side, tiny.tokenizer.pad_token_id)
    images = [im for _, ims in samples for im in ims]
    px = pixels(tiny, images)
    sizes = [im.size for im in images]
    out = model(input_ids=ids, attention_mask=mask, images=px, image_sizes=sizes)
    layout = model.visual_layout
    assert layout.padding_side == "right"  # forward keeps the config's side (tokenizer_padding_side)
    for b, (logits, kept, _) in enumerate(alone):
        n = layout.seq_lens[b]
        torch.testing.assert_close(out.logits[b, :n], logits, atol=ATOL, rtol=0)
        assert n == logits.shape[0]
        for j, image in enumerate(layout.image_index[b]):
            assert torch.equal(layout.kept_indices[image], kept[j])
    stats = model.pruning_stats
    assert [s["images"] for s in stats] == [1, 2, 0]
    assert stats[2]["visual_tokens_before"] == 0 and stats[2]["seq_len_after"] == stats[2]["text_tokens"]

    gen = model.generate(ids, attention_mask=mask, images=px, image_sizes=sizes, **generate)
    for b, (_, _, tokens) in enumerate(alone):
        assert torch.equal(gen[b], tokens)
    assert model.visual_layout.padding_side == "left"


@torch.no_grad()
def test_labels_attention_and_positions_follow_the_splice(tiny_v15):
    model = tiny_v15.model
    model.set_pruning(PruneConfig(layer=0, ratio=0.5))
    samples = _samples(tiny_v15)
    seqs = [token_ids(tiny_v15.tokenizer, prompt) for prompt, _ in samples]
    ids, mask = pad_batch(seqs, "left", tiny_v15.tokenizer.pad_token_id)
    labels = torch.where(mask, ids, IGNORE_INDEX).masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    images = [im for _, ims in samples for im in ims]
    _, pos, new_mask, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, pixels(tiny_v15, images), [im.size for im in images]
    )
    layout = model.visual_layout
    visual = layout.visual_mask()
    assert new_mask.dtype == mask.dtype and embeds.shape[:2] == new_labels.shape == pos.shape == new_mask.shape
    for b, seq in enumerate(seqs):
        n = layout.seq_lens[b]
        assert int(new_mask[b].sum()) == n
        assert valid_rows(pos, new_mask, b).tolist() == list(range(n))
        # labels: text labels in order, IGNORE_INDEX on visual tokens and padding
        text_labels = seq[seq != IMAGE_TOKEN_INDEX]
        assert torch.equal(new_labels[b][new_mask[b] & ~visual[b]], text_labels)
        assert bool((new_labels[b][visual[b] | ~new_mask[b]] == IGNORE_INDEX).all())
        assert int(visual[b].sum()) == sum(e - s for s, e in layout.spans[b]) == 8 * len(layout.image_index[b])
        assert not bool(embeds[b][~new_mask[b]].any())  # padding rows are zero
    out = model(input_ids=ids, attention_mask=mask, labels=labels, images=pixels(tiny_v15, images), image_sizes=[im.size for im in images])
    assert torch.isfinite(out.loss)


@torch.no_grad()
def test_loglikelihood_style_forward_with_labels(tiny_v15):
    """lmms-eval's loglikelihood call: model(input_ids, labels, images, use_cache, image_sizes)."""
    model = tiny_v15.model
    image = noise_image(30)
    context = token_ids(tiny_v15.tokenizer, chat_prompt("What is it?"))
    answer = tiny_v15.tokenizer("A cat", add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = torch.cat([context, answer])[None]
    labels = ids.clone()
    labels[0, : context.numel()] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels, images=pixels(tiny_v15, [image]).half(), use_cache=True, image_sizes=[image.size])
    logits = out["logits"][0]
    # the answer's tokens sit at the end; loss = mean CE of predicting them from the previous positions
    n = answer.numel()
    expected = torch.nn.functional.cross_entropy(logits[-n - 1 : -1].float(), answer)
    torch.testing.assert_close(out["loss"], expected, atol=1e-5, rtol=0)
