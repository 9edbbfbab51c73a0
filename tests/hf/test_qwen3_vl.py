"""OTPrune on transformers' own `Qwen3VLForConditionalGeneration` (with DeepStack) and
`Qwen3_5ForConditionalGeneration` (otprune.hf.qwen3_vl), tiny checkpoints.

The reference is built by hand from the model's public pieces (`get_rope_index`,
`get_image_features` / `get_video_features` with their `deepstack_features`, the input
embeddings, `language_model(..., visual_pos_masks, deepstack_visual_embeds)`, `lm_head`) and
`otprune.select_tokens`, with the unpatched model.
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
from otprune.hf.base import compact_batch
from otprune.hf.qwen2_5_vl import VisualSets
from otprune.hf.qwen2_5_vl_tiny import SPECIAL_IDS
from otprune.hf.qwen3_vl import deepstack_of_kept

TOL = {"atol": 1e-5, "rtol": 1e-5}
FAMILIES = ("qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe")


QWEN3 = pytest.mark.parametrize("hf_family", FAMILIES, indirect=True)


# 24 (128 x 192), 9 (96 x 96) and 20 (160 x 128) merged tokens.
IMAGES = [image(128, 192, 0), image(96, 96, 1), image(160, 128, 2)]


TWO = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "Compare."}]


def batch_inputs(processor):
    """Left-padded batch: one image; two images with text between; text only."""
    texts = [
        chat(processor, [{"type": "image"}, {"type": "text", "text": "What is it?"}]),
        chat(processor, TWO),
        chat(processor, [{"type": "text", "text": "No picture here, just text."}]),
    ]
    return processor(text=texts, images=IMAGES, padding=True, padding_side="left", return_tensors="pt")


def two_images(processor):
    return processor(text=[chat(processor, TWO)], images=IMAGES[1:], return_tensors="pt")


def video(processor):
    frames = np.stack([np.asarray(image(96, 128, 10 + i)) for i in range(4)])  # 2 temporal patches x 3 x 4 tokens
    text = chat(processor, [{"type": "video"}, {"type": "text", "text": "What happens?"}])
    metadata = [{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}]
    return processor(text=[text], videos=[frames], video_metadata=metadata, do_sample_frames=False, return_tensors="pt")


@torch.no_grad()
def reference_logits(model, inputs, ratio: float, method: str = "otprune", deepstack: bool = True):
    """Pruned logits of ONE unpadded sample from the model's public pieces."""
    assert "forward" not in vars(model)
    ids = inputs["input_ids"]
    inner = model.model
    positions, _ = inner.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    embeds = model.get_input_embeddings()(ids)[0].clone()  # (L, D)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    visual = torch.zeros(ids.shape[1], dtype=torch.bool)
    stacks: dict[int, torch.Tensor] = {}  # DeepStack layer -> (L, D) features at visual rows
    for pixels, grid, token_id, encode in (
        ("pixel_values", "image_grid_thw", SPECIAL_IDS["<|image_pad|>"], inner.get_image_features),
        ("pixel_values_videos", "video_grid_thw", SPECIAL_IDS["<|video_pad|>"], inner.get_video_features),
    ):
        if inputs.get(pixels) is None:
            continue
        out = encode(inputs[pixels], inputs[grid])
        rows = (ids[0] == token_id).nonzero().squeeze(1).split([f.shape[0] for f in out.pooler_output])
        for layer, per_item in enumerate(getattr(out, "deepstack_features", None) or []):
            stack = stacks.setdefault(layer, torch.zeros_like(embeds))
            for item, item_rows in zip(per_item, rows, strict=True):
                stack[item_rows] = item
        for item, item_rows in zip(out.pooler_output, rows, strict=True):
            embeds[item_rows] = item
            kept = otprune.select_tokens(item, ratio, method)
            keep[item_rows] = False
            keep[item_rows[kept]] = True
            visual[item_rows[kept]] = True
    rows = keep.nonzero().squeeze(1)
    extra = {}
    if stacks and deepstack:
        extra = {"visual_pos_masks": visual[rows][None], "deepstack_visual_embeds": [stacks[i][rows][visual[rows]] for i in sorted(stacks)]}
    hidden = inner.language_model(inputs_embeds=embeds[rows][None], position_ids=positions[:, :, rows], **extra).last_hidden_state
    return model.lm_head(hidden), rows


@QWEN3
@torch.no_grad()
def test_ratio_one_equals_unpruned(hf_family):
    model, tiny = hf_family.model, hf_family
    inputs = batch_inputs(tiny.processor)
    reference = model(**inputs).logits
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=1.0)) as adapter:
        logits = model(**inputs).logits
        assert [s["image_tokens_after"] for s in adapter.last_stats] == [[24], [9, 20], []]
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], reference[mask], **TOL)


@QWEN3
@torch.no_grad()
@pytest.mark.parametrize("method", ["otprune", "divprune"])
def test_pruned_logits_equal_reference(hf_family, method):
    model, tiny = hf_family.model, hf_family
    inputs = two_images(tiny.processor)
    reference, rows = reference_logits(model, inputs, 0.3, method)
    with hf.pruning(model, otprune.PruneConfig(method=method, layer=0, ratio=0.3)):
        logits = model(**inputs).logits
    assert logits.shape[1] == rows.numel() == inputs["input_ids"].shape[1] - (9 + 20) + (3 + 6)
    torch.testing.assert_close(logits, reference, **TOL)
    if tiny.family in ("qwen3_vl", "qwen3_vl_moe"):  # DeepStack matters: the reference without it differs
        without, _ = reference_logits(model, inputs, 0.3, method, deepstack=False)
        assert (without - logits).abs().max() > 1e-2


@QWEN3
@torch.no_grad()
def test_video_pruned_like_an_image(hf_family):
    model, tiny = hf_family.model, hf_family
    inputs = video(tiny.processor)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    tokens = t * h * w // 4  # both frames: one token set
    reference, _ = reference_logits(model, inputs, 0.25)
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.25)) as adapter:
        logits = model(**inputs).logits
    assert adapter.last_stats[0]["image_tokens_before"] == [tokens] == [12]
    assert adapter.last_stats[0]["image_tokens_after"] == [3]
    torch.testing.assert_close(logits, reference, **TOL)


@QWEN3
@torch.no_grad()
def test_generate_with_cache_equals_loop_without_cache(hf_family):
    model, tiny = hf_family.model, hf_family
    inputs = batch_inputs(tiny.processor)
    pad = SPECIAL_IDS["<|endoftext|>"]
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.3)):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=pad, eos_token_id=None)  # fmt: skip
        tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        steps, ids, mask = [], inputs["input_ids"], inputs["attention_mask"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        for s in range(tokens.shape[1]):  # re-forward the growing sequence, no cache
            steps.append(model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1])
            ids = torch.cat([ids, tokens[:, s : s + 1]], dim=1)
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], mask.new_zeros(3, 1)], dim=1)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), torch.stack(steps, dim=1), **TOL)


@QWEN3
def test_unsupported_config_refused(hf_family):
    model = hf_family.model
    with pytest.raises(ValueError, match="LAYER_INDEX=2"):
        hf.apply(model, otprune.PruneConfig(layer=2, ratio=0.5))


@QWEN3
@torch.no_grad()
def test_pruned_batch_equals_each_sample_alone(hf_family):
    """Left padding, three samples: each sample's DeepStack rows land on its own kept tokens.

    Qwen3.5's own (unpruned) batch differs from its samples alone by up to ~1.5e-4 on these tiny
    weights (its Gated DeltaNet layers on a padded batch): it gets that model's tolerance."""
    model, processor = hf_family.model, hf_family.processor
    tol = {"atol": 5e-4, "rtol": 1e-4} if hf_family.family.startswith("qwen3_5") else TOL
    texts = [chat(processor, [{"type": "image"}, {"type": "text", "text": "What is it?"}]), chat(processor, TWO),
             chat(processor, [{"type": "text", "text": "No picture here, just text."}])]  # fmt: skip
    images = [[IMAGES[0]], IMAGES[1:], None]
    inputs = batch_inputs(processor)
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.3)) as adapter:
        batch = model(**inputs).logits
        lengths = [s["seq_len_after"] for s in adapter.last_stats]
        for b in range(3):
            logits = model(**processor(text=[texts[b]], images=images[b], return_tensors="pt")).logits[0]
            assert logits.shape[0] == lengths[b]
            torch.testing.assert_close(batch[b, batch.shape[1] - lengths[b] :], logits, **tol)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_deepstack_of_kept_brute_force(data):
    """Per DeepStack layer, the kept visual rows' features in row-major order of the pruned batch."""
    batch, length = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 8))
    flat = list(range(batch * length))
    visual = sorted(data.draw(st.lists(st.sampled_from(flat), min_size=1, max_size=len(flat), unique=True)))
    cut = data.draw(st.integers(1, len(visual)))
    sets = VisualSets([torch.tensor(visual[:cut]), *([torch.tensor(visual[cut:])] if cut < len(visual) else [])], [], [])
    kept = [torch.tensor(sorted(data.draw(st.lists(st.integers(0, r.numel() - 1), min_size=1, unique=True)))) for r in sets.rows]
    layers = [[torch.randn(r.numel(), 3) for r in sets.rows] for _ in range(2)]
    valid = torch.ones(batch, length, dtype=torch.bool)
    keep = valid.clone().view(-1)
    keep[torch.tensor(visual)] = False
    for rows, k in zip(sets.rows, kept, strict=True):
        keep[rows[k]] = True
    compact = compact_batch(keep.view(batch, length), data.draw(st.sampled_from(["left", "right"])))
    mask, embeds = deepstack_of_kept(layers, sets, kept, compact, (batch, length))
    # brute force: walk the pruned batch row by row
    source = {int(r): (i, j) for i, rows in enumerate(sets.rows) for j, r in enumerate(rows.tolist()) if j in kept[i].tolist()}
    order = [source[int(r)] for r in compact.index.reshape(-1).tolist() if int(r) in source]
    assert mask.sum() == len(order) == sum(k.numel() for k in kept)
    for layer, got in zip(layers, embeds, strict=True):
        torch.testing.assert_close(got, torch.stack([layer[i][j] for i, j in order]), rtol=0, atol=0)


@QWEN3
@torch.no_grad()
def test_unpruned_prefill_counted_for_a_listener(hf_family):
    """Pruning off with `on_stats` set (lmms-eval records of an unpruned run): logits untouched, tokens counted."""
    stats = unpruned_prefill_stats(hf_family.model, batch_inputs(hf_family.processor))
    assert [s["image_tokens_before"] for s in stats] == [[24], [9, 20], []]
