"""Small builders shared by the llava tests: random images, prompts, padded batches."""

from __future__ import annotations

import numpy as np
import torch
from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image


def noise_image(seed: int, size=(40, 30), mode: str = "RGB") -> Image.Image:
    """A random image of (width, height) in `mode`."""
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode=mode)


def chat_prompt(question: str, n_images: int = 1, template: str = "vicuna_v1", before: str = "") -> str:
    """The template's prompt with `n_images` placeholders after `before` and before the question."""
    conv = conv_templates[template].copy()
    images = " ".join([DEFAULT_IMAGE_TOKEN] * n_images)
    body = f"{before}{images}\n{question}" if n_images else question
    conv.append_message(conv.roles[0], body)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def token_ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def pad_batch(sequences: list[torch.Tensor], side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the sequences padded on `side`."""
    length = max(s.numel() for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for b, seq in enumerate(sequences):
        start = length - seq.numel() if side == "left" else 0
        ids[b, start : start + seq.numel()] = seq
        mask[b, start : start + seq.numel()] = True
    return ids, mask


def pixels(tiny, images: list[Image.Image]):
    return process_images(images, tiny.image_processor, tiny.model.config)


def valid_rows(tensor: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Sample b's rows of a padded (B, L, ...) tensor."""
    return tensor[b][mask[b].bool()]
