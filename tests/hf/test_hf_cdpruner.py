"""CDPruner in otprune.hf (transformers' LlavaForConditionalGeneration), tiny checkpoint, CPU.

The CLIP text side is a tiny full CLIP checkpoint whose vision weights are the tiny LLaVA's tower
(`otprune.hf.tiny.write_tiny_clip`). The reference is built from the public pieces alone: the
instruction tokenized by hand into CDPruner's segments, transformers' `CLIPTextModelWithProjection`
/ `CLIPVisionModelWithProjection` of that checkpoint, the model's own vision tower and projector, the
relevance formula, then the kept set from the explicit log-det greedy (numpy), and the pruned
sequence built token by token and fed to the model without adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import cosine_kernel, greedy_by_logdet
from PIL import Image
from test_hf_prumerge import spliced
from test_llava_families import reference_logits

from otprune import PruneConfig, hf
from otprune.methods.cdpruner import QUESTION_SUFFIX

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO = 0.3
CONFIG = PruneConfig(method="cdpruner", layer=0, ratio=RATIO)
QUESTIONS = ["What color is the box?" + QUESTION_SUFFIX, "Describe the picture in a few words."]
IMAGES = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
          for seed, (h, w) in ((1, (70, 100)), (2, (120, 60)))]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, _hf_models):
    from otprune.hf.tiny import write_tiny_clip

    return str(write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", _hf_models("llava").model.model.vision_tower))


def _inputs(tiny, indices) -> dict:
    texts = [tiny.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}],
                                                add_generation_prompt=True) for i in indices]
    return dict(tiny.processor(images=[IMAGES[i] for i in indices], text=texts, return_tensors="pt", padding=True))


def _oracle_kept(tiny, clip_dir: str, pixel_values: torch.Tensor, question: str, theta: float = 0.0) -> list[int]:
    """Image 0 of `pixel_values` scored against `question` from the public pieces, the explicit log-det greedy."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    inner = tiny.model.model
    text_model = CLIPTextModelWithProjection.from_pretrained(clip_dir).double()
    projection = CLIPVisionModelWithProjection.from_pretrained(clip_dir).visual_projection.double()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text = question.replace(QUESTION_SUFFIX, "")
    ids = tokenizer(text)["input_ids"]
    ctx = text_model.config.max_position_embeddings
    segments = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    rows = torch.tensor([s + [0] * (ctx - len(s)) for s in segments])
    masks = torch.tensor([[1] * len(s) + [0] * (ctx - len(s)) for s in segments])
    with torch.no_grad():
        txt = text_model(input_ids=rows, attention_mask=masks).text_embeds.numpy()
        out = inner.vision_tower(pixel_values[:1], output_hidden_states=True)
        patches = out.hidden_states[inner.config.vision_feature_layer][0, 1:]
        tower = inner.vision_tower
        norm = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.vision_model.post_layernorm
        img = projection(norm(patches).double()).numpy()
        x = inner.multi_modal_projector(patches[None])[0].double().numpy()
    r = np.array([-np.mean([e @ t / np.linalg.norm(e) / np.linalg.norm(t) for t in txt]) for e in img])
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    if theta:
        r = np.exp(theta / (2 * (1 - theta)) * r)
    k = round(RATIO * x.shape[0])
    return sorted(greedy_by_logdet(r[:, None] * cosine_kernel(x) * r[None], k, min_gain=0.0)), x


def _reference_logits(tiny, inputs: dict, kept: list[list[int]], features: list[np.ndarray]) -> torch.Tensor:
    """The model without adapter on the pruned, left-padded batch built token by token (`spliced`)."""
    tokens = [torch.from_numpy(f[k]).float() for f, k in zip(features, kept, strict=True)]
    embeds, attention, positions = spliced(tiny, inputs, tokens)
    return reference_logits(tiny, embeds, attention, positions), attention


def _logits(tiny, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return tiny.model(**inputs).logits


@pytest.mark.parametrize("theta", [0.0, 0.5])
def test_pruned_forward_matches_the_reference_and_batch_equals_alone(hf_llava, clip_dir, theta, monkeypatch):
    monkeypatch.setenv("CDPRUNER_CLIP", clip_dir)
    adapter = hf.apply(hf_llava.model, PruneConfig(method="cdpruner", layer=0, ratio=RATIO, params={"theta": theta}))
    alone = []
    for i in range(2):
        inputs = _inputs(hf_llava, [i])
        assert adapter.instructions(inputs["input_ids"], inputs["attention_mask"].bool()) == [QUESTIONS[i].replace(QUESTION_SUFFIX, "")]
        kept, x = _oracle_kept(hf_llava, clip_dir, inputs["pixel_values"], QUESTIONS[i], theta)
        expected, attention = _reference_logits(hf_llava, inputs, [kept], [x])
        actual = _logits(hf_llava, inputs)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        stats = adapter.last_stats[0]
        assert (stats["image_tokens_before"], stats["image_tokens_after"]) == ([x.shape[0]], [len(kept)])
        alone.append(actual[0])
    batch = _logits(hf_llava, _inputs(hf_llava, [0, 1]))  # left padded, each sample its own instruction
    for b in range(2):
        n = alone[b].shape[0]
        torch.testing.assert_close(batch[b, batch.shape[1] - n:], alone[b], rtol=1e-4, atol=1e-4)


def test_the_instruction_decides_the_kept_tokens(hf_llava, clip_dir):
    adapter = hf.apply(hf_llava.model, CONFIG)
    adapter.clip_checkpoint = clip_dir  # instead of CDPRUNER_CLIP
    inputs = _inputs(hf_llava, [0])
    base = _logits(hf_llava, inputs)
    first, x = _oracle_kept(hf_llava, clip_dir, inputs["pixel_values"], QUESTIONS[0])
    sets = {tuple(first)}
    for text in ("A completely different question about the scene", "zzz"):
        adapter.set_instructions([text])
        kept = _oracle_kept(hf_llava, clip_dir, inputs["pixel_values"], text)[0]
        sets.add(tuple(kept))
        expected, _ = _reference_logits(hf_llava, inputs, [kept], [x])
        torch.testing.assert_close(_logits(hf_llava, inputs), expected, rtol=1e-5, atol=1e-5)
    assert len(sets) > 1, "every instruction keeps the same tokens: the test would prove nothing"
    adapter.set_instructions(["a", "b"])
    with pytest.raises(ValueError, match="set_instructions: 2 texts for a batch of 1"):
        _logits(hf_llava, inputs)
    adapter.set_instructions(None)
    torch.testing.assert_close(_logits(hf_llava, inputs), base)


def test_generate_prunes_with_the_instruction(hf_llava, clip_dir, monkeypatch):
    """generate encodes the images before the prefill (mm_encoder_outputs): the hidden states come along."""
    monkeypatch.setenv("CDPRUNER_CLIP", clip_dir)
    inputs = _inputs(hf_llava, [0, 1])
    adapter = hf.apply(hf_llava.model, CONFIG)
    with torch.no_grad():
        out = hf_llava.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert [s["image_tokens_after"] for s in adapter.last_stats] == [[round(RATIO * 16)]] * 2
    first = _logits(hf_llava, inputs)[:, -1].argmax(-1)
    assert out[:, inputs["input_ids"].shape[1]].tolist() == first.tolist()


def test_without_the_clip_text_tower_it_refuses(hf_llava, monkeypatch):
    inputs = _inputs(hf_llava, [0])
    hf.apply(hf_llava.model, CONFIG)
    with pytest.raises(ValueError, match="CDPRUNER_CLIP: unset"):
        _logits(hf_llava, inputs)
    monkeypatch.setenv("CDPRUNER_CLIP", hf_llava.path)  # a llava checkpoint: no CLIP text tower
    with pytest.raises(ValueError, match=r"CDPRUNER_CLIP=.*'llava' checkpoint without one"):
        _logits(hf_llava, inputs)


def _anyres_oracle_kept(tiny, clip_dir: str, inputs: dict, image: int, question: str) -> tuple[list[int], np.ndarray]:
    """LLaVA-1.6: image `image`'s crops scored from the public pieces (one min-max over all its crops),
    the relevance laid out by hand like the tokens (base crop; the grid's rows, unpadded with
    transformers' `unpad_image`, each ending in a newline token of relevance 1), the explicit greedy."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    inner, config = tiny.model.model, tiny.model.config
    size = inputs["image_sizes"][image].tolist()  # (height, width)
    crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
    text_model = CLIPTextModelWithProjection.from_pretrained(clip_dir).double()
    projection = CLIPVisionModelWithProjection.from_pretrained(clip_dir).visual_projection.double()
    ids = CLIPTokenizer.from_pretrained(clip_dir)(question.replace(QUESTION_SUFFIX, ""))["input_ids"]
    ctx = text_model.config.max_position_embeddings
    segments = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    with torch.no_grad():
        txt = text_model(input_ids=torch.tensor([q + [0] * (ctx - len(q)) for q in segments]),
                         attention_mask=torch.tensor([[1] * len(q) + [0] * (ctx - len(q)) for q in segments])).text_embeds.numpy()
        tower = inner.vision_tower
        out = tower(inputs["pixel_values"][image, :crops], output_hidden_states=True)
        patches = out.hidden_states[config.vision_feature_layer][:, 1:]  # (P, N, C)
        norm = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.vision_model.post_layernorm
        img = projection(norm(patches).double()).flatten(0, 1).numpy()
        x = inner.get_image_features(inputs["pixel_values"][image:image + 1], inputs["image_sizes"][image:image + 1],
                                     return_dict=True).pooler_output[0].double().numpy()
    r = np.array([-np.mean([e @ t / np.linalg.norm(e) / np.linalg.norm(t) for t in txt]) for e in img])
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    side = config.vision_config.image_size // config.vision_config.patch_size
    n = side * side
    grid_h, grid_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
    rows, cols = np.meshgrid(np.arange(grid_h * side), np.arange(grid_w * side), indexing="ij")
    index = (1 + (rows // side) * grid_w + cols // side) * n + (rows % side) * side + cols % side
    index = unpad_image(torch.from_numpy(index)[None], size)[0].numpy()
    laid = list(range(n)) + [i for row in index for i in [*row.tolist(), -1]]  # -1: a newline token
    assert crops > 1 and len(laid) == x.shape[0]
    rel = np.array([1.0 if i < 0 else r[i] for i in laid])
    kept = sorted(greedy_by_logdet(rel[:, None] * cosine_kernel(x) * rel[None], round(RATIO * len(laid)), min_gain=0.0))
    return kept, x


def test_llava_next_anyres_matches_the_reference_and_batch_equals_alone(_hf_models, clip_dir):
    tiny = _hf_models("llava_next")
    adapter = hf.apply(tiny.model, CONFIG)
    adapter.clip_checkpoint = clip_dir
    try:
        alone = []
        for i in range(2):
            inputs = _inputs(tiny, [i])
            kept, x = _anyres_oracle_kept(tiny, clip_dir, inputs, 0, QUESTIONS[i])
            expected, _ = _reference_logits(tiny, inputs, [kept], [x])
            actual = _logits(tiny, inputs)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            alone.append(actual[0])
        batch = _logits(tiny, _inputs(tiny, [0, 1]))
        for b in range(2):
            n = alone[b].shape[0]
            torch.testing.assert_close(batch[b, batch.shape[1] - n:], alone[b], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            out = tiny.model.generate(**_inputs(tiny, [0, 1]), max_new_tokens=2, do_sample=False)
        assert out.shape == (2, _inputs(tiny, [0, 1])["input_ids"].shape[1] + 2)
        for stats in adapter.last_stats:  # generate's prefill pruned each image (encoded before it, with its crops)
            assert stats["image_tokens_after"] == [round(RATIO * t) for t in stats["image_tokens_before"]]
    finally:
        adapter.remove()


def test_families_without_the_instruction_refuse(_hf_models, clip_dir, monkeypatch):
    monkeypatch.setenv("CDPRUNER_CLIP", clip_dir)
    model = _hf_models("onevision").model
    with pytest.raises(ValueError, match="BASELINE=CDPRUNER: scores the tokens against each prompt's instruction"):
        hf.apply(model, CONFIG)


def test_lmms_eval_attach_gives_the_tokenizer_and_loads_the_text_side(hf_llava, clip_dir, monkeypatch):
    """lmms-eval's `llava_hf` with BASELINE=CDPRUNER: the plugin hands the adapter lmms-eval's tokenizer and
    loads the CLIP text side before any sample (a missing CDPRUNER_CLIP stops the run there)."""
    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    from otprune.eval import lmms_plugin

    for key, value in {"BASELINE": "CDPRUNER", "SUBSET_RATIO": str(RATIO)}.items():
        monkeypatch.setenv(key, value)
    lm = SimpleNamespace(_model=hf_llava.model, _tokenizer=hf_llava.processor.tokenizer)
    with pytest.raises(ValueError, match="CDPRUNER_CLIP: unset"):
        lmms_plugin.attach(lm)
    monkeypatch.setenv("CDPRUNER_CLIP", clip_dir)
    adapter = lmms_plugin.attach(lm)
    assert adapter.instruction_tokenizer is hf_llava.processor.tokenizer and adapter.clip_text_side().name == clip_dir
    inputs = _inputs(hf_llava, [0])
    kept, x = _oracle_kept(hf_llava, clip_dir, inputs["pixel_values"], QUESTIONS[0])
    expected, _ = _reference_logits(hf_llava, inputs, [kept], [x])
    torch.testing.assert_close(_logits(hf_llava, inputs), expected, rtol=1e-5, atol=1e-5)
