"""CDPruner in our llava: the tiny checkpoint's tower becomes a full tiny CLIP (text side added, the
vision weights unchanged); the kept set against the log-det oracle on the relevance computed here
from CLIP's text / image embeddings and the formula (numpy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids
from oracles import cosine_kernel, greedy_by_logdet

QUESTION = "What color is the box?"


def _with_text_side(tower_dir: str) -> None:
    """Rewrite the tower folder as a full CLIPModel with the same vision weights and a tiny text tower."""
    from transformers import CLIPVisionModel

    from otprune.hf.tiny import write_tiny_clip

    write_tiny_clip(tower_dir, CLIPVisionModel.from_pretrained(tower_dir))


@pytest.fixture(scope="module")
def tiny_clip_llava(tmp_path_factory):
    from llava.tiny import write_tiny_llava

    path = str(write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-cdpruner", seed=3))
    tower = json.loads((Path(path) / "config.json").read_text())["mm_vision_tower"]
    _with_text_side(tower if os.path.isabs(tower) else str(Path(path) / tower))
    return _load(path)


def _text_features(clip, tokenizer, text: str) -> np.ndarray:
    """(M, C) CLIP's text features of `text`'s ids cut into zero-padded segments of the context length."""
    tok = tokenizer(text=[text], return_tensors="pt")
    ids = tok["input_ids"][0].tolist()
    ctx = clip.config.text_config.max_position_embeddings
    ids += [0] * (-len(ids) % ctx)
    mask = tok["attention_mask"][0].tolist() + [0] * (len(ids) - tok["input_ids"].shape[1])
    txt = clip.get_text_features(input_ids=torch.tensor(ids).view(-1, ctx), attention_mask=torch.tensor(mask).view(-1, ctx))
    return (txt.pooler_output if hasattr(txt, "pooler_output") else txt).numpy()


def _oracle_keep(model, px, text: str, k: int) -> list[int]:
    """The relevance from CLIP's own text / vision models and the formula, then the explicit log-det greedy."""
    from transformers import CLIPModel

    tower = model.get_vision_tower()
    clip = CLIPModel.from_pretrained(tower.vision_tower_name).double()
    with torch.no_grad():
        out = clip.vision_model(px.double(), output_hidden_states=True)
        patches = out.hidden_states[tower.select_layer][0, 1:]
        img = clip.visual_projection(clip.vision_model.post_layernorm(patches)).numpy()
        txt = _text_features(clip, tower._text_side.tokenizer, text)
        x = model.encode_images(px)[0].double().numpy()
    r = np.array([-np.mean([e @ t / np.linalg.norm(e) / np.linalg.norm(t) for t in txt]) for e in img])
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    return sorted(greedy_by_logdet(r[:, None] * cosine_kernel(x) * r[None], k, min_gain=0.0))


@torch.no_grad()
def test_cdpruner_matches_the_oracle_and_batch_equals_alone(tiny_clip_llava, monkeypatch):
    monkeypatch.setenv("BASELINE", "CDPRUNER")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    model = tiny_clip_llava.model
    questions = [QUESTION + "\nAnswer the question using a single word or phrase.", "Describe the image in detail."]
    images = [noise_image(11), noise_image(12, (50, 30))]
    ids = [token_ids(tiny_clip_llava.tokenizer, chat_prompt(q)) for q in questions]
    px = pixels(tiny_clip_llava, images)
    alone = []
    for i in range(2):
        from llava.model.llava_arch import _Plan

        texts = model.instruction_texts(ids[i][None], _Plan.from_inputs(ids[i][None], None))
        assert texts == [questions[i].replace("\nAnswer the question using a single word or phrase.", "")]
        model.prepare_inputs_labels_for_multimodal(ids[i][None], None, None, None, None, px[i:i + 1], None)
        kept = model.visual_layout.kept_indices[0].tolist()
        n = model.visual_layout.tokens_before[0]
        assert kept == _oracle_keep(model, px[i:i + 1], texts[0], round(0.25 * n))
        alone.append(kept)
    batch_ids, mask = pad_batch(ids, "left", 0)
    model.prepare_inputs_labels_for_multimodal(batch_ids, None, mask, None, None, px, None)
    assert [k.tolist() for k in model.visual_layout.kept_indices] == alone
    model.set_instructions(["something else entirely", "and another"])
    try:
        model.prepare_inputs_labels_for_multimodal(batch_ids, None, mask, None, None, px, None)
        assert [k.tolist() for k in model.visual_layout.kept_indices] != alone  # the instruction matters
    finally:
        model.set_instructions(None)


def test_a_tower_without_text_side_is_refused(tiny_v15, monkeypatch):
    monkeypatch.setenv("BASELINE", "CDPRUNER")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    model = tiny_v15.model
    ids = token_ids(tiny_v15.tokenizer, chat_prompt(QUESTION))
    with pytest.raises(ValueError, match="CLIP text tower"):
        model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, None, pixels(tiny_v15, [noise_image(1)]), None)


@pytest.fixture(scope="module")
def tiny_clip_llava_v16(tmp_path_factory):
    from llava.tiny import write_tiny_llava

    path = str(write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-v16-cdpruner", v16=True, seed=4))
    tower = json.loads((Path(path) / "config.json").read_text())["mm_vision_tower"]
    _with_text_side(tower if os.path.isabs(tower) else str(Path(path) / tower))
    return _load(path)


def _load(path: str):
    from collections import namedtuple

    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizer, model, processor, _ = load_pretrained_model(path, None, get_model_name_from_path(path), device_map="cpu")
    return namedtuple("Tiny", "tokenizer model image_processor path")(tokenizer, model, processor, path)


def _anyres_oracle_keep(model, image, crops: torch.Tensor, text: str, ratio: float, theta: float) -> list[int]:
    """LLaVA-1.6: the relevance of every CLIP patch of all the image's crops (one min-max), laid out by
    hand like the tokens (base crop; the grid's rows, unpadded, each ending in a newline token of
    relevance 1), then the explicit log-det greedy on the model's own laid-out tokens."""
    from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
    from transformers import CLIPModel

    tower = model.get_vision_tower()
    clip = CLIPModel.from_pretrained(tower.vision_tower_name).double()
    vision = tower.vision_tower.double()
    try:
        with torch.no_grad():
            hidden = vision(crops.double(), output_hidden_states=True).hidden_states[tower.select_layer][:, 1:]  # (P, N, C)
            norm = vision.post_layernorm if hasattr(vision, "post_layernorm") else vision.vision_model.post_layernorm
            img = clip.visual_projection(norm(hidden)).flatten(0, 1).numpy()
            txt = _text_features(clip, tower._text_side.tokenizer, text)
    finally:
        vision.float()
    r = np.array([-np.mean([e @ t / np.linalg.norm(e) / np.linalg.norm(t) for t in txt]) for e in img])
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    side = tower.num_patches_per_side
    n = side * side
    grid_w, grid_h = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
    rows, cols = np.meshgrid(np.arange(grid_h * side), np.arange(grid_w * side), indexing="ij")
    index = (1 + (rows // side) * grid_w + cols // side) * n + (rows % side) * side + cols % side  # patch of each grid cell
    index = unpad_image(torch.from_numpy(index)[None], image.size)[0].numpy()
    laid = list(range(n)) + [i for row in index for i in [*row.tolist(), -1]]  # -1: a newline token
    rel = np.array([1.0 if i < 0 else r[i] for i in laid])
    if theta:
        rel = np.exp(theta / (2 * (1 - theta)) * rel)
    with torch.no_grad():
        x = model.image_features(crops[None], [image.size])[0].double().numpy()
    assert x.shape[0] == len(laid)
    return sorted(greedy_by_logdet(rel[:, None] * cosine_kernel(x) * rel[None], round(ratio * len(laid)), min_gain=0.0))


@pytest.mark.parametrize("theta", ["0", "0.5"])
@torch.no_grad()
def test_anyres_selects_on_the_laid_out_set_against_the_oracle(tiny_clip_llava_v16, monkeypatch, theta):
    monkeypatch.setenv("BASELINE", "CDPRUNER")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    monkeypatch.setenv("CDPRUNER_THETA", theta)
    tiny = tiny_clip_llava_v16
    model = tiny.model
    images = [noise_image(21, (60, 30)), noise_image(22, (30, 50))]
    questions = [QUESTION, "Where is the red ball? Answer briefly please, with as many words as needed."]
    ids = [token_ids(tiny.tokenizer, chat_prompt(q)) for q in questions]
    px = pixels(tiny, images)
    alone = []
    for i in range(2):
        model.prepare_inputs_labels_for_multimodal(ids[i][None], None, None, None, None, px[i:i + 1], [images[i].size])
        kept = model.visual_layout.kept_indices[0].tolist()
        crops = px[i] if isinstance(px, list) else px[i]
        assert crops.shape[0] > 1, "one crop: the test would not cover anyres"
        assert kept == _anyres_oracle_keep(model, images[i], crops, questions[i], 0.25, float(theta))
        alone.append(kept)
    batch_ids, mask = pad_batch(ids, "left", 0)
    model.prepare_inputs_labels_for_multimodal(batch_ids, None, mask, None, None, px, [im.size for im in images])
    assert [k.tolist() for k in model.visual_layout.kept_indices] == alone
