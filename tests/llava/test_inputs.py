"""Inputs: placeholder/image mismatches, image modes and sizes, anyres geometry, prompt helpers."""

from __future__ import annotations

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    select_best_resolution,
    tokenizer_image_token,
    unpad_image,
)
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids

from otprune import PruneConfig


@pytest.mark.parametrize(("placeholders", "n_images"), [(1, 2), (2, 1), (1, 0)])
@torch.no_grad()
def test_image_count_must_match_placeholders(tiny_v15, placeholders, n_images):
    ids = token_ids(tiny_v15.tokenizer, chat_prompt("Compare.", n_images=placeholders))[None]
    images = [noise_image(i) for i in range(n_images)]
    px = pixels(tiny_v15, images) if images else None
    with pytest.raises(ValueError, match="placeholder"):
        tiny_v15.model(input_ids=ids, images=px)
    with pytest.raises(ValueError, match="placeholder"):
        tiny_v15.model.generate(ids, images=px, max_new_tokens=2)


def test_anyres_needs_image_sizes(tiny_v16):
    ids = token_ids(tiny_v16.tokenizer, chat_prompt("Describe."))[None]
    with pytest.raises(ValueError, match="image_sizes"):
        tiny_v16.model(input_ids=ids, images=pixels(tiny_v16, [noise_image(1, (60, 20))]))


def test_image_sizes_must_match_the_crops(tiny_v16):
    ids = token_ids(tiny_v16.tokenizer, chat_prompt("Describe."))[None]
    px = pixels(tiny_v16, [noise_image(1, (60, 20))])  # 2 x 1 grid
    with pytest.raises(ValueError, match="anyres grid"):
        tiny_v16.model(input_ids=ids, images=px, image_sizes=[(64, 64)])  # 2 x 2


@pytest.mark.parametrize("version", ["v15", "v16"])
@pytest.mark.parametrize(("mode", "size"), [("L", (30, 20)), ("RGBA", (20, 30)), ("RGB", (1, 1)), ("L", (1, 1))])
@torch.no_grad()
def test_grayscale_rgba_and_1x1_images(request, version, mode, size):
    tiny = request.getfixturevalue(f"tiny_{version}")
    tiny.model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    image = noise_image(5, size, mode)
    ids = token_ids(tiny.tokenizer, chat_prompt("Describe the image."))[None]
    px = pixels(tiny, [image])
    out = tiny.model(input_ids=ids, images=px, image_sizes=[image.size])
    assert torch.isfinite(out.logits).all()
    (stats,) = tiny.model.pruning_stats
    assert stats["visual_tokens_after"] == round(0.25 * stats["visual_tokens_before"])


@pytest.mark.parametrize(
    ("size", "crops", "tokens"),
    [
        # (width, height) -> crops after the base image, tokens = 16 base + rows x (cols + newline)
        ((60, 20), 2, 16 + 2 * 9),  # grid 64x32 (2 across); rows 1-2 of 4 kept
        ((20, 60), 2, 16 + 8 * 3),  # grid 32x64 (2 down); cols 1-2 of 4 kept
        ((32, 32), 2, 16 + 4 * 5),  # ties -> first pinpoint 32x64; rows 2-5 of 8 kept
        ((1, 1), 2, 16 + 4 * 5),
        ((90, 30), 3, 16 + 4 * 13),  # grid 96x32 (3 across); no padding to drop
    ],
)
@torch.no_grad()
def test_anyres_token_counts_follow_the_grid_geometry(tiny_v16, size, crops, tokens):
    image = noise_image(6, size)
    px = pixels(tiny_v16, [image])
    assert px.shape == (1, 1 + crops, 3, 32, 32)
    features = tiny_v16.model.image_features(px, [size])
    assert features[0].shape == (tokens, 64)


def test_anyres_geometry_helpers():
    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert select_best_resolution((60, 20), pinpoints) == (64, 32)
    assert select_best_resolution((20, 60), pinpoints) == (32, 64)
    assert select_best_resolution((100, 100), pinpoints) == (64, 64)
    assert get_anyres_image_grid_shape((90, 30), pinpoints, 32) == (3, 1)
    assert get_anyres_image_grid_shape((336, 672), "[(336, 672), (672, 336)]", 336) == (1, 2)
    assert get_anyres_image_grid_shape((10, 10), "(1x1),...,(2x2)", 336) == (1, 1)
    grid = torch.arange(4 * 8).view(1, 4, 8)
    assert unpad_image(grid, (60, 20)).shape == (1, 2, 8)  # int(20 * 8/60) = 2 rows: drop 1 top, 1 bottom
    assert torch.equal(unpad_image(grid, (60, 20))[0, 0], torch.arange(8, 16))
    assert unpad_image(grid, (64, 32)).shape == (1, 4, 8)


def test_tokenizer_image_token_keeps_bos_once_and_marks_images(tiny_v15):
    tok = tiny_v15.tokenizer
    ids = tokenizer_image_token("Look <image> and <image>\nnow", tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    first = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[:first] == tok("Look ").input_ids
    assert tokenizer_image_token("<image>\nHi", tok, return_tensors="pt")[:2].tolist() == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("x", tok, return_tensors="np")


def test_tokenizer_matches_sentencepiece(tiny_v15):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=f"{tiny_v15.path}/tokenizer.model")
    tok = tiny_v15.tokenizer
    for text in ["USER: Describe the image. ASSISTANT:", "A chat between a curious user and an artificial intelligence assistant.", "3 cats, 12 dogs: é"]:
        assert tok(text).input_ids == [1, *sp.encode(text)]
    assert tok("The end</s>").input_ids[-1] == tok.eos_token_id == 2
    assert tok.pad_token_id == 0 and tok.decode(sp.encode("Describe the image.")) == "Describe the image."


def test_conversation_templates():
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )
    conv.messages[1][1] = "A cat."
    assert conv.get_prompt().endswith("ASSISTANT: A cat.</s>")
    assert conv_templates["vicuna_v1"].messages == []  # copy() did not share the turns
    for name in ["vicuna_v1", "llava_v1", "v1", "plain", "llava_llama_2", "mistral_instruct", "chatml_direct", "default"]:
        c = conv_templates[name].copy()
        c.append_message(c.roles[0], "Hi")
        c.append_message(c.roles[1], None)
        assert "Hi" in c.get_prompt() and c.sep is not None
    llama2 = conv_templates["llava_llama_2"].copy()
    llama2.append_message(llama2.roles[0], "Hi")
    llama2.append_message(llama2.roles[1], None)
    assert llama2.get_prompt().startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert llama2.get_prompt().endswith("\n<</SYS>>\n\nHi [/INST]")
    chatml = conv_templates["chatml_direct"].copy()
    chatml.append_message(chatml.roles[0], "Hi")
    chatml.append_message(chatml.roles[1], None)
    assert chatml.get_prompt() == "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    plain = conv_templates["plain"].copy()
    plain.append_message(plain.roles[0], "<image>")
    plain.append_message(plain.roles[1], None)
    assert plain.get_prompt() == "<image>\n"


def test_model_name_and_stopping_criteria(tiny_v15):
    assert get_model_name_from_path("liuhaotian/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("/runs/llava-x/checkpoint-100") == "llava-x_checkpoint-100"
    tok = tiny_v15.tokenizer
    prompt = torch.tensor([[1, 5, 6]])
    stop = KeywordsStoppingCriteria(["</s>"], tok, prompt)
    assert stop(torch.tensor([[40, 41, 2], [40, 41, 42]])).tolist() == [True, False]
    text = KeywordsStoppingCriteria(["yes"], tok, prompt)
    ids = tok("it is yes", add_special_tokens=False, return_tensors="pt").input_ids
    assert text(ids).tolist() == [True]
