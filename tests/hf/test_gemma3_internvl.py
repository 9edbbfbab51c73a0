"""OTPrune on transformers' own `Gemma3ForConditionalGeneration` (otprune.hf.gemma3) and
`InternVLForConditionalGeneration` (otprune.hf.internvl), tiny checkpoints.

The reference is built by hand from the model's public pieces (`get_image_features`, the input
embeddings, the placeholder rows of `input_ids`) and `otprune.select_tokens`: the kept rows'
embeddings (and for Gemma 3 the kept rows' `token_type_ids`, which give its bidirectional image
blocks) go to the unpatched model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image as image
from conftest import unpruned_prefill_stats
from conftest import user_prompt as chat
from hypothesis import given, settings
from hypothesis import strategies as st

import otprune
from otprune import hf
from otprune.hf.internvl import placeholder_runs

TOL = {"atol": 1e-5, "rtol": 1e-5}


LLAVA_LIKE = pytest.mark.parametrize("hf_family", ("gemma3", "internvl"), indirect=True)


# Gemma 3: 16 tokens each. InternVL: 64 x 128 -> 2 crops + thumbnail = 48 tokens; 64 x 64 -> 16; 128 x 64 -> 48.
IMAGES = [image(64, 128, 0), image(64, 64, 1), image(128, 64, 2)]
TOKENS = {"gemma3": [[16], [16, 16], []], "internvl": [[48], [16, 48], []]}


TWO = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "Compare."}]


def batch_inputs(processor):
    """Left-padded batch: one image; two images with text between; text only."""
    texts = [chat(processor, [{"type": "image"}, {"type": "text", "text": "What is it?"}]), chat(processor, TWO),
             chat(processor, [{"type": "text", "text": "No picture here, just text."}])]  # fmt: skip
    return processor(text=texts, images=[[IMAGES[0]], IMAGES[1:], []], padding=True, padding_side="left", return_tensors="pt")


def two_images(processor):
    return processor(text=[chat(processor, TWO)], images=[IMAGES[1:]], return_tensors="pt")


@torch.no_grad()
def reference(model, inputs, ratio: float, method: str = "otprune", bidirectional: bool = True):
    """Pruned logits of ONE unpadded sample from the model's public pieces; the kept rows (L',)."""
    assert "forward" not in vars(model.model)
    inner = model.model
    ids = inputs["input_ids"][0]
    token_id = int(inner.config.image_token_id)
    tiles = inner.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output  # (N, T, D)
    rows = (ids == token_id).nonzero().squeeze(1)
    # one token set per run of placeholders (Gemma 3: an image; InternVL: an image's tiles, or a frame)
    runs = torch.tensor([0, *((rows[1:] != rows[:-1] + 1).nonzero().squeeze(1) + 1).tolist(), rows.numel()])
    embeds = inner.get_input_embeddings()(ids[None])[0].clone()
    embeds[rows] = tiles.reshape(-1, tiles.shape[-1])
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[rows] = False
    for start, end in zip(runs[:-1].tolist(), runs[1:].tolist(), strict=True):
        kept = otprune.select_tokens(embeds[rows[start:end]], ratio, method)
        keep[rows[start:end][kept]] = True
    kept_rows = keep.nonzero().squeeze(1)
    extra = {}
    if "token_type_ids" in inputs:
        types = inputs["token_type_ids"][:, kept_rows]
        extra["token_type_ids"] = types if bidirectional else torch.zeros_like(types)
    return model(inputs_embeds=embeds[kept_rows][None], **extra).logits, kept_rows


def test_placeholder_runs():
    ids = torch.tensor([[0, 5, 5, 1, 5, 0], [5, 5, 5, 0, 0, 5]])
    assert placeholder_runs(ids, 5) == [2, 1, 3, 1]
    assert placeholder_runs(torch.zeros(2, 3, dtype=torch.long), 5) == []


@LLAVA_LIKE
@torch.no_grad()
def test_ratio_one_equals_unpruned(hf_family):
    model, tiny = hf_family.model, hf_family
    inputs = batch_inputs(tiny.processor)
    expected = model(**inputs).logits
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=1.0)) as adapter:
        logits = model(**inputs).logits
        assert [s["image_tokens_after"] for s in adapter.last_stats] == TOKENS[tiny.family]
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], expected[mask], **TOL)


@LLAVA_LIKE
@torch.no_grad()
@pytest.mark.parametrize("method", ["otprune", "divprune"])
def test_pruned_logits_equal_reference(hf_family, method):
    model, tiny = hf_family.model, hf_family
    inputs = two_images(tiny.processor)
    expected, rows = reference(model, inputs, 0.25, method)
    with hf.pruning(model, otprune.PruneConfig(method=method, layer=0, ratio=0.25)) as adapter:
        logits = model(**inputs).logits
    before = TOKENS[tiny.family][1]
    assert adapter.last_stats[0]["image_tokens_after"] == [round(0.25 * t) for t in before]
    assert logits.shape[1] == rows.numel() == inputs["input_ids"].shape[1] - sum(before) + sum(round(0.25 * t) for t in before)
    torch.testing.assert_close(logits, expected, **TOL)
    if tiny.family == "gemma3":  # the kept tokens of an image attend to each other both ways
        causal_only, _ = reference(model, inputs, 0.25, method, bidirectional=False)
        assert (causal_only - logits).abs().max() > 1e-2


@LLAVA_LIKE
@torch.no_grad()
def test_generate_with_cache_equals_loop_without_cache(hf_family):
    model, tiny = hf_family.model, hf_family
    inputs = batch_inputs(tiny.processor)
    pad = tiny.processor.tokenizer.pad_token_id
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.25)):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=pad, eos_token_id=None)  # fmt: skip
        tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        steps, grown = [], dict(inputs)
        for s in range(tokens.shape[1]):  # re-forward the growing sequence, no cache
            steps.append(model(**grown, use_cache=False).logits[:, -1])
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in grown:
                    tail = tokens[:, s : s + 1] if key == "input_ids" else torch.full_like(tokens[:, :1], int(key == "attention_mask"))
                    grown[key] = torch.cat([grown[key], tail], dim=1)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), torch.stack(steps, dim=1), **TOL)


@pytest.mark.parametrize("hf_family", ["internvl"], indirect=True)  # Gemma 3 has no video input
@torch.no_grad()
def test_internvl_video_frames_are_token_sets(hf_family):
    frames = np.stack([np.asarray(image(64, 64, 10 + i)) for i in range(3)])
    model, tiny = hf_family.model, hf_family
    inputs = tiny.processor(text=[chat(tiny.processor, [{"type": "video"}, {"type": "text", "text": "What happens?"}])],
                            videos=[frames], return_tensors="pt")  # fmt: skip
    expected, _ = reference(model, inputs, 0.25)
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.25)) as adapter:
        logits = model(**inputs).logits
    assert adapter.last_stats[0]["image_tokens_after"] == [4, 4, 4]
    torch.testing.assert_close(logits, expected, **TOL)


@LLAVA_LIKE
def test_cls_methods_refused(hf_family):
    model = hf_family.model
    with pytest.raises(ValueError, match="PRUMERGE"):
        hf.apply(model, otprune.PruneConfig(method="prumerge", layer=0, ratio=0.25))


@LLAVA_LIKE
@torch.no_grad()
def test_pruned_batch_equals_each_sample_alone(hf_family):
    """Left padding, three samples (Gemma 3: each sample's image blocks follow its own kept rows)."""
    model, processor = hf_family.model, hf_family.processor
    texts = [chat(processor, [{"type": "image"}, {"type": "text", "text": "What is it?"}]), chat(processor, TWO),
             chat(processor, [{"type": "text", "text": "No picture here, just text."}])]  # fmt: skip
    images = [[IMAGES[0]], IMAGES[1:], None]
    inputs = batch_inputs(processor)
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.25)) as adapter:
        batch = model(**inputs).logits
        lengths = [s["seq_len_after"] for s in adapter.last_stats]
        for b in range(3):
            alone = processor(text=[texts[b]], images=[images[b]] if images[b] else None, return_tensors="pt")
            logits = model(**alone).logits[0]
            assert logits.shape[0] == lengths[b]
            torch.testing.assert_close(batch[b, batch.shape[1] - lengths[b] :], logits, **TOL)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 5]), min_size=1, max_size=12), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_placeholder_runs_brute_force(rows):
    expected = []
    for row in rows:  # brute force: walk each row
        for t, value in enumerate(row):
            if value == 5:
                if t > 0 and row[t - 1] == 5:
                    expected[-1] += 1
                else:
                    expected.append(1)
    assert placeholder_runs(torch.tensor(rows), 5) == expected


@pytest.mark.parametrize("hf_family", ["gemma3"], indirect=True)
@torch.no_grad()
def test_gemma3_pan_and_scan_crops_are_token_sets(hf_family):
    """With pan-and-scan, the image and each of its crops is its own `<start_of_image>` block: one set each."""
    model, processor = hf_family.model, hf_family.processor
    inputs = processor(text=[chat(processor, [{"type": "image"}, {"type": "text", "text": "Hi"}])],
                       images=[[image(64, 200, 3)]], do_pan_and_scan=True, pan_and_scan_min_crop_size=32,
                       pan_and_scan_min_ratio_to_activate=1.2, pan_and_scan_max_num_crops=4, return_tensors="pt")  # fmt: skip
    assert inputs["pixel_values"].shape[0] == 4  # the image and 3 crops
    expected, _ = reference(model, inputs, 0.25)
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.25)) as adapter:
        logits = model(**inputs).logits
    assert adapter.last_stats[0]["image_tokens_after"] == [4, 4, 4, 4]
    torch.testing.assert_close(logits, expected, **TOL)


@LLAVA_LIKE
@torch.no_grad()
def test_unpruned_prefill_counted_for_a_listener(hf_family):
    """Pruning off with `on_stats` set (lmms-eval records of an unpruned run): logits untouched, tokens counted."""
    stats = unpruned_prefill_stats(hf_family.model, batch_inputs(hf_family.processor))
    assert [s["image_tokens_before"] for s in stats] == TOKENS[hf_family.family]
