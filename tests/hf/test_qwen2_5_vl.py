"""OTPrune on transformers' own `Qwen2_5_VLForConditionalGeneration` (otprune.hf.qwen2_5_vl), tiny checkpoint.

References are built by hand from the model's own pieces (`get_image_features`,
`get_video_features`, `get_rope_index`, the input embeddings) and `otprune.select_tokens`, then
fed to the unpatched model.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from conftest import unpruned_prefill_stats
from PIL import Image

import otprune
from otprune import hf
from otprune.hf.qwen2_5_vl import Qwen2_5_VLAdapter
from otprune.hf.qwen2_5_vl_tiny import MAX_PIXELS, MIN_PIXELS, SPECIAL_IDS, write_tiny_qwen2_5_vl
from otprune.methods.otprune import official_order
from otprune.stats import SampleStats

IGNORE_INDEX = -100
TOL = {"atol": 2e-5, "rtol": 2e-5}


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("hf") / "tiny-qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(processor, model) loaded offline, fp32, eval."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        processor = AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32, local_files_only=True)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return processor, model.eval()


@pytest.fixture
def processor(tiny):
    return tiny[0]


@pytest.fixture
def model(tiny):
    """The model, with any otprune adapter removed after the test."""
    model = tiny[1]
    yield model
    adapter = getattr(model, "_otprune_adapter", None)
    if adapter is not None:
        adapter.remove()
    assert "forward" not in vars(model)


# -------------------------------------------------------------------- inputs
def image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


# Three images with 24 (112x168), 9 (84x84) and 20 (140x112) merged tokens.
IMAGES = [image(112, 168, 0), image(84, 84, 1), image(140, 112, 2)]


def prompt(processor, n_images: int, text: str, image_after_text: bool = False) -> str:
    parts = [{"type": "image"}] * n_images
    parts = [{"type": "text", "text": text}, *parts] if image_after_text else [*parts, {"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sample_inputs(processor, n_images: int, text: str, images, **kwargs):
    return processor(text=[prompt(processor, n_images, text)], images=images or None, return_tensors="pt", **kwargs)


# The batch: one image; two images with text between them; text only.
def batch_samples(processor):
    two = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [
        (prompt(processor, 1, "What is it?"), [IMAGES[0]]),
        (two, [IMAGES[1], IMAGES[2]]),
        (prompt(processor, 0, "No picture here, just text."), []),
    ]


def batch_inputs(processor, side: str = "left"):
    samples = batch_samples(processor)
    images = [im for _, ims in samples for im in ims]
    return processor(text=[t for t, _ in samples], images=images, padding=True, padding_side=side, return_tensors="pt")


def alone_inputs(processor, index: int):
    text, images = batch_samples(processor)[index]
    return processor(text=[text], images=images or None, return_tensors="pt")


def video_inputs(processor):
    frames = np.stack([np.asarray(image(84, 112, 10 + i)) for i in range(4)])  # (T, H, W, 3)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False)


# -------------------------------------------------------------------- the hand-built reference
@torch.no_grad()
def reference_forward(model, inputs, ratio: float, method: str = "otprune", order: str = "ascending", labels=None):
    """Pruned logits of ONE sample (B=1, no padding), built from the model's own pieces.

    Returns (outputs of the unpatched model on the pruned sequence, kept input rows (L',),
    full positions (3, 1, L)).
    """
    assert "forward" not in vars(model), "the reference needs the unpatched model"
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1
    inner = model.model
    positions, _ = inner.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )
    embeds = model.get_input_embeddings()(ids)[0].clone()  # (L, D)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    order_of_rows = torch.arange(ids.shape[1])
    for pixels, grid, token_id, encode in (
        ("pixel_values", "image_grid_thw", SPECIAL_IDS["<|image_pad|>"], inner.get_image_features),
        ("pixel_values_videos", "video_grid_thw", SPECIAL_IDS["<|video_pad|>"], inner.get_video_features),
    ):
        if inputs.get(pixels) is None:
            continue
        features = encode(inputs[pixels], inputs[grid]).pooler_output  # per item (T_i, D)
        rows = (ids[0] == token_id).nonzero().squeeze(1).split([f.shape[0] for f in features])
        for item, item_rows in zip(features, rows, strict=True):
            embeds[item_rows] = item
            if order == "official":
                picks = otprune.select_tokens(item, ratio, method, order="greedy").tolist()
                kept = torch.tensor(official_order(picks))
            else:
                kept = otprune.select_tokens(item, ratio, method)
            keep[item_rows] = False
            keep[item_rows[kept]] = True
            # the kept tokens enter in the order of `kept`: permute the rows of this item's slots
            order_of_rows[item_rows[kept.sort().values]] = item_rows[kept]
    rows = order_of_rows[keep.nonzero().squeeze(1)]  # (L',) input rows, in the order handed over
    ref_labels = labels[:, rows] if labels is not None else None
    out = model(inputs_embeds=embeds[rows][None], position_ids=positions[:, :, rows], labels=ref_labels)
    return out, rows, positions


def real_rows(logits, mask_row, side):
    n = int(mask_row.sum())
    return logits[-n:] if side == "left" else logits[:n]


# -------------------------------------------------------------------- the checkpoint
def test_tiny_checkpoint_loads_offline(tiny_dir, tiny):
    processor, model = tiny
    files = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    tok = processor.tokenizer
    for token, index in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == index
    assert model.config.image_token_id == SPECIAL_IDS["<|image_pad|>"] == processor.image_token_id
    assert model.config.video_token_id == SPECIAL_IDS["<|video_pad|>"] == processor.video_token_id
    assert tok.decode(tok("Hello, wörld!")["input_ids"]) == "Hello, wörld!"
    text = prompt(processor, 1, "Hi")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = sample_inputs(processor, 1, "Hi", [IMAGES[0]])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 12]]  # 112 x 168 px -> 8 x 12 patches -> 24 tokens
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 24
    assert inputs["mm_token_type_ids"].sum() == 24


def test_lmms_eval_style_inputs(model, processor):
    """lmms-eval's qwen2_5_vl wrapper: chat template on message lists, qwen_vl_utils, left-padded generate."""
    process_vision_info = pytest.importorskip("qwen_vl_utils").process_vision_info
    buffer = io.BytesIO()
    IMAGES[0].save(buffer, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "image", "image": url, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS},
                {"type": "text", "text": question},
            ]},
        ]
        for question in ("What?", "What is in the picture?")
    ]  # fmt: skip
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    inputs = processor(text=texts, images=images, videos=videos, padding=True, padding_side="left", return_tensors="pt")
    adapter = hf.apply(model, otprune.PruneConfig(layer=0, ratio=0.25))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id,
                         pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    assert out.shape[0] == 2
    assert [s["image_tokens_after"] for s in adapter.last_stats] == [[6], [6]]


# -------------------------------------------------------------------- equality with the unpruned model
@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_ratio_one_equals_unpruned(model, processor, side):
    inputs = batch_inputs(processor, side)
    reference = model(**inputs).logits
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=1.0)) as adapter:
        logits = model(**inputs).logits
        assert [s["image_tokens_after"] for s in adapter.last_stats] == [[24], [9, 20], []]
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], reference[mask], **TOL)


@torch.no_grad()
def test_pruning_off_calls_straight_through(model, processor):
    inputs = batch_inputs(processor)
    reference = model(**inputs).logits
    adapter = hf.apply(model)  # the environment: LAYER_INDEX unset -> off
    assert isinstance(adapter, Qwen2_5_VLAdapter)
    torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=0)
    assert adapter.last_stats == [] and adapter.state is None


@torch.no_grad()
def test_remove_restores_unpruned_logits(model, processor):
    inputs = sample_inputs(processor, 1, "What is it?", [IMAGES[0]])
    reference = model(**inputs).logits
    adapter = hf.apply(model, otprune.PruneConfig(layer=0, ratio=0.25))
    assert "forward" in vars(model)
    assert model(**inputs).logits.shape[1] == reference.shape[1] - 18
    adapter.remove()
    assert "forward" not in vars(model) and getattr(model, "_otprune_adapter", None) is None
    torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=0)


# -------------------------------------------------------------------- equality with the hand-built reference
@torch.no_grad()
@pytest.mark.parametrize("method", [m for m in otprune.METHODS if not getattr(otprune.METHODS[m], "needs_instruction", False)])
def test_pruned_logits_equal_reference(model, processor, method):
    # text, image, text, image, text: two images of one sample, each pruned on its own
    inputs = alone_inputs(processor, 1)
    ratio = 0.3
    ids = inputs["input_ids"]
    labels = ids.masked_fill(ids == SPECIAL_IDS["<|image_pad|>"], IGNORE_INDEX)
    reference, rows, _ = reference_forward(model, inputs, ratio, method, labels=labels)
    with hf.pruning(model, otprune.PruneConfig(method=method, layer=0, ratio=ratio)):
        out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == rows.numel() == ids.shape[1] - (9 + 20) + (3 + 6)
    torch.testing.assert_close(out.logits, reference.logits, **TOL)
    torch.testing.assert_close(out.loss, reference.loss, **TOL)


@torch.no_grad()
def test_official_order_moves_tokens_with_their_positions(model, processor):
    inputs = alone_inputs(processor, 0)
    reference, rows, _ = reference_forward(model, inputs, 0.15, order="official")  # K = 4 of 24
    assert not bool((rows[1:] > rows[:-1]).all()), "the official order should not be ascending here"
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.15, order="official")):
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference.logits, **TOL)


@torch.no_grad()
def test_video_pruned_like_an_image(model, processor):
    inputs = video_inputs(processor)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    tokens = t * h * w // 4
    reference, rows, _ = reference_forward(model, inputs, 0.25)
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.25)) as adapter:
        logits = model(**inputs).logits
    assert adapter.last_stats[0]["image_tokens_before"] == [tokens]
    assert adapter.last_stats[0]["image_tokens_after"] == [round(0.25 * tokens)]
    torch.testing.assert_close(logits, reference.logits, **TOL)


@torch.no_grad()
def test_kept_tokens_keep_their_unpruned_positions(model, processor):
    inputs = alone_inputs(processor, 1)
    _, rows, positions = reference_forward(model, inputs, 0.3)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.3)):
            model(**inputs)
    finally:
        hook.remove()
    (given,) = seen
    assert given.shape == (4, 1, rows.numel())
    torch.testing.assert_close(given[1:], positions[:, :, rows], rtol=0, atol=0)  # M-RoPE rows: unpruned ids
    torch.testing.assert_close(given[0, 0], torch.arange(rows.numel()), rtol=0, atol=0)  # the sequence the cache sees
    text = (inputs["mm_token_type_ids"][0] == 0).nonzero().squeeze(1)
    assert set(text.tolist()) <= set(rows.tolist()), "a text token was dropped"


# -------------------------------------------------------------------- batches
@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_each_sample_alone(model, processor, side):
    inputs = batch_inputs(processor, side)
    config = otprune.PruneConfig(layer=0, ratio=0.3)
    with hf.pruning(model, config) as adapter:
        batch = model(**inputs).logits
        stats = adapter.last_stats
        alone = []
        for b in range(3):
            alone.append(model(**alone_inputs(processor, b)).logits[0])
            if stats[b]["images"]:  # (a text-only forward is not a multimodal prefill: no new stats)
                assert adapter.last_stats[0]["image_tokens_after"] == stats[b]["image_tokens_after"]
    for b in range(3):
        n = stats[b]["seq_len_after"]
        assert alone[b].shape[0] == n
        compact_mask = torch.zeros(batch.shape[1], dtype=torch.bool)
        if side == "left":
            compact_mask[batch.shape[1] - n :] = True
        else:
            compact_mask[:n] = True
        torch.testing.assert_close(batch[b][compact_mask], alone[b], **TOL)


@torch.no_grad()
def test_keep_counts_and_stats(model, processor):
    inputs = batch_inputs(processor)
    ratio = 0.3
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=ratio)) as adapter:
        logits = model(**inputs).logits
    stats = adapter.last_stats
    assert len(stats) == 3 and all(isinstance(s, SampleStats) for s in stats)
    before = [[24], [9, 20], []]
    assert [s["image_tokens_before"] for s in stats] == before
    for s, tokens in zip(stats, before, strict=True):
        expected = otprune.keep_counts(ratio, torch.tensor(tokens, dtype=torch.long)).tolist() if tokens else []
        assert s["image_tokens_after"] == expected == [round(ratio * t) for t in tokens]
        assert s["images"] == len(tokens)
        assert s["seq_len_after"] == s["seq_len_before"] - sum(tokens) + sum(expected)
        assert s["method"] == "otprune" and s["layer"] == 0 and s["ratio"] == ratio and s["batch_size"] == 3
        assert s["select_ms"] >= 0 and s["prefill_ms"] >= s["select_ms"]
    real = inputs["attention_mask"].sum(dim=1).tolist()
    assert [s["seq_len_before"] for s in stats] == real
    assert logits.shape[1] == max(s["seq_len_after"] for s in stats)


# -------------------------------------------------------------------- generation
def test_unpruned_prefill_counted_for_a_listener(model, processor):
    """Pruning off with `on_stats` set (records): each image's tokens counted (runs of
    <|image_pad|> between <|vision_start|> / <|vision_end|>), logits untouched."""
    stats = unpruned_prefill_stats(model, batch_inputs(processor))
    assert [s["image_tokens_before"] for s in stats] == [[24], [9, 20], []]
    for s in stats:
        assert s["seq_len_after"] == s["seq_len_before"] == s["text_tokens"] + s["visual_tokens_before"]


def greedy_logits_without_cache(model, inputs, tokens):
    """Logits of each step of a greedy continuation `tokens` (B, S): re-forward the growing sequence."""
    steps = []
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for s in range(tokens.shape[1]):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
        steps.append(out.logits[:, -1])
        ids = torch.cat([ids, tokens[:, s : s + 1]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], mask.new_zeros(mask.shape[0], 1)], dim=1)
    return torch.stack(steps, dim=1)  # (B, S, V)


@torch.no_grad()
def test_generate_with_cache_equals_loop_without_cache(model, processor):
    inputs = batch_inputs(processor)  # left padded
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.3)):
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=SPECIAL_IDS["<|endoftext|>"], eos_token_id=None)  # fmt: skip
        tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        cached = torch.stack(out.logits, dim=1)  # (B, 5, V)
        uncached = greedy_logits_without_cache(model, inputs, tokens)
    assert tokens.shape == (3, 5)
    torch.testing.assert_close(cached, uncached, **TOL)
    assert torch.equal(cached.argmax(-1), tokens)


@torch.no_grad()
def test_manual_decode_uses_consistent_rope_deltas(model, processor):
    """A cached step without position_ids: the model's own rule (mask cumsum + rope_deltas) gives
    the token its unpruned position."""
    inputs = batch_inputs(processor)
    nxt = torch.tensor([[65], [66], [67]])
    with hf.pruning(model, otprune.PruneConfig(layer=0, ratio=0.3)):
        prefill = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(3, 1)], dim=1)
        step = model(input_ids=nxt, attention_mask=mask, cache=prefill.cache).logits[:, -1]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        types = torch.cat([inputs["mm_token_type_ids"], nxt.new_zeros(3, 1)], dim=1)
        full = model(input_ids=torch.cat([inputs["input_ids"], nxt], dim=1), attention_mask=mask,
                     mm_token_type_ids=types, **extra).logits[:, -1]  # fmt: skip
    torch.testing.assert_close(step, full, **TOL)


# -------------------------------------------------------------------- switches
@torch.no_grad()
def test_environment_switches_pruning(model, processor, monkeypatch):
    inputs = sample_inputs(processor, 1, "What is it?", [IMAGES[0]])
    adapter = hf.apply(model)
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    monkeypatch.setenv("BASELINE", "DIVPRUNE")
    pruned = model(**inputs).logits
    assert adapter.last_stats[0]["method"] == "divprune" and adapter.last_stats[0]["image_tokens_after"] == [6]
    adapter.remove()
    reference, _, _ = reference_forward(model, inputs, 0.25, "divprune")
    torch.testing.assert_close(pruned, reference.logits, **TOL)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"BASELINE": "nope", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.5"}, "BASELINE='nope'"),
        ({"LAYER_INDEX": "0", "SUBSET_RATIO": "2"}, "SUBSET_RATIO='2'"),
        ({"LAYER_INDEX": "x", "SUBSET_RATIO": "0.5"}, "LAYER_INDEX='x'"),
        ({"LAYER_INDEX": "0"}, "SUBSET_RATIO"),
        ({"LAYER_INDEX": "1", "SUBSET_RATIO": "0.5"}, "LAYER_INDEX=1.*supported: LAYER_INDEX=0"),
        ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, "BASELINE=FASTV.*supported: LAYER_INDEX=0"),
        ({"BASELINE": "VTW", "LAYER_INDEX": "2"}, "BASELINE=VTW.*supported: LAYER_INDEX=0"),
    ],
)
def test_bad_switches_raise_naming_the_variable(model, processor, monkeypatch, env, match):
    inputs = sample_inputs(processor, 1, "What is it?", [IMAGES[0]])
    hf.apply(model)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        model(**inputs)


def test_unsupported_configs_refused_at_apply(model):
    for config, match in [
        (otprune.PruneConfig(layer=2, ratio=0.5), "LAYER_INDEX=2"),
        (otprune.PruneConfig(method="fastv", ratio=0.5), "BASELINE=FASTV"),
        (otprune.PruneConfig(method="vtw", layer=1), "BASELINE=VTW"),
    ]:
        with pytest.raises(ValueError, match=match):
            hf.apply(model, config)
        assert "forward" not in vars(model)
