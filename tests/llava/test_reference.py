"""Pruning off: our model equals a forward assembled by hand from transformers' public classes.

Oracle: the CLIP tower truncated to `select_layer` (so no hidden-state indexing), the projector
as explicit matrix products from the safetensors file, the image tokens spliced in by hand
at the placeholder, and a separately built `LlamaForCausalLM` with eager attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

ATOL = 2e-4


def reference_parts(path: str, tower_from_checkpoint: bool):
    """(tower truncated to layer -2, projector function, Llama) loaded independently of `llava.model`."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    weights = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    tower_dir = Path(config["mm_vision_tower"])
    tower_cfg = json.loads((tower_dir / "config.json").read_text())
    assert config["mm_vision_select_layer"] == -2
    # hidden_states[-2] of an L-layer tower is the output of its first L - 1 layers.
    tower_cfg = {k: v for k, v in tower_cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    tower_cfg["num_hidden_layers"] -= 1
    tower = CLIPVisionModel(CLIPVisionConfig(**tower_cfg, attn_implementation="eager")).eval()
    if tower_from_checkpoint:
        prefix = "model.vision_tower.vision_tower.vision_model."
        source = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    else:
        source = {k.removeprefix("vision_model."): v for k, v in load_file(str(tower_dir / "model.safetensors")).items()}
    missing, _ = tower.load_state_dict(source, strict=False)
    assert not missing

    def projector(x):
        h = x @ weights["model.mm_projector.0.weight"].T + weights["model.mm_projector.0.bias"]
        h = torch.nn.functional.gelu(h)
        return h @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]

    llm_keys = {k: v for k, v in weights.items() if not k.startswith(("model.mm_projector", "model.vision_tower", "model.image_newline"))}
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=config["rope_theta"],
            max_position_embeddings=config["max_position_embeddings"],
            attn_implementation="eager",
        )
    ).eval()
    missing, unexpected = llama.load_state_dict(llm_keys, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    newline = weights.get("model.image_newline")
    return tower, projector, llama, newline


@torch.no_grad()
def reference_logits(llama, ids: torch.Tensor, image_tokens: list[torch.Tensor]) -> torch.Tensor:
    """Embed the text, put image_tokens[i] at the i-th placeholder, run the Llama."""
    embed = llama.get_input_embeddings().weight
    pieces, images = [], iter(image_tokens)
    for token in ids.tolist():
        pieces.append(next(images) if token == IMAGE_TOKEN_INDEX else embed[token][None])
    return llama(inputs_embeds=torch.cat(pieces)[None]).logits[0]


@torch.no_grad()
def test_v15_logits_equal_hand_built_reference(tiny_v15):
    tower, projector, llama, _ = reference_parts(tiny_v15.path, tower_from_checkpoint=False)
    images = [noise_image(1, (40, 30)), noise_image(2, (25, 50))]
    prompt = chat_prompt("What is in the two pictures?", n_images=2, before="Look: ")
    ids = token_ids(tiny_v15.tokenizer, prompt)
    px = pixels(tiny_v15, images)
    tokens = [projector(tower(px[i : i + 1]).last_hidden_state[0, 1:]) for i in range(2)]
    expected = reference_logits(llama, ids, tokens)
    got = tiny_v15.model(input_ids=ids[None], images=px).logits[0]
    assert got.shape == expected.shape == (ids.numel() - 2 + 2 * 16, llama.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_v16_logits_equal_hand_built_anyres_reference(tiny_v16):
    """60x20 image: grid 64x32 -> 2 crops across, 1 down; the 4 x 8 token grid keeps rows 1-2."""
    tower, projector, llama, newline = reference_parts(tiny_v16.path, tower_from_checkpoint=True)
    image = noise_image(3, (60, 20))
    ids = token_ids(tiny_v16.tokenizer, chat_prompt("Describe the image."))
    px = pixels(tiny_v16, [image])
    assert px.shape == (1, 3, 3, 32, 32)
    crops = [projector(tower(px[0, i : i + 1]).last_hidden_state[0, 1:]) for i in range(3)]  # (16, D) each
    rows = []
    for r in (1, 2):  # unpadded rows of the 4 x 8 grid
        for c in range(8):
            rows.append(crops[1 + c // 4][r * 4 + c % 4])
        rows.append(newline)
    tokens = torch.cat([crops[0], torch.stack(rows)])
    assert tokens.shape[0] == 16 + 2 * 9
    expected = reference_logits(llama, ids, [tokens])
    got = tiny_v16.model(input_ids=ids[None], images=px, image_sizes=[image.size]).logits[0]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("version", ["v15", "v16"])
def test_generate_returns_new_tokens_as_text(version, request):
    tiny = request.getfixturevalue(f"tiny_{version}")
    image = noise_image(4, (30, 45))
    ids = token_ids(tiny.tokenizer, chat_prompt("Describe the image."))
    out = tiny.model.generate(
        ids[None], images=pixels(tiny, [image]), image_sizes=[image.size], max_new_tokens=6, do_sample=False,
        min_new_tokens=6,
    )
    assert out.shape == (1, 6)  # the new tokens only, as the original
    text = tiny.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert isinstance(text[0], str) and text[0]


@torch.no_grad()
def test_generate_continues_the_forward_greedily(tiny_v15):
    """The first generated token is the argmax of the forward's last logits."""
    image = noise_image(5)
    ids = token_ids(tiny_v15.tokenizer, chat_prompt("What color is the object?"))[None]
    px = pixels(tiny_v15, [image])
    logits = tiny_v15.model(input_ids=ids, images=px).logits
    out = tiny_v15.model.generate(ids, images=px, max_new_tokens=1, do_sample=False)
    assert out[0, 0] == logits[0, -1].argmax()


@torch.no_grad()
def test_text_only_forward_and_generate(tiny_v15):
    ids = tiny_v15.tokenizer("USER: Describe the image. ASSISTANT:", return_tensors="pt").input_ids
    logits = tiny_v15.model(input_ids=ids).logits
    out = tiny_v15.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3) and out[0, 0] == logits[0, -1].argmax()
