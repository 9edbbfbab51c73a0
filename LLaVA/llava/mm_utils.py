"""Image preprocessing, prompt tokenisation and stopping criteria for LLaVA.

`process_images` turns PIL images into the pixel tensors the model takes, following the
checkpoint's `image_aspect_ratio`:

- `"pad"` (LLaVA-1.5): pad to a square with the processor's mean colour, then resize + crop.
- `"anyres"` (LLaVA-1.6): pick the grid resolution from `image_grid_pinpoints` that keeps the
  most of the image, resize and pad to it, cut it into crops of the vision tower's input size,
  and put a resized copy of the whole image first: (1 + crops, 3, S, S) per image.
- anything else: the processor's own resize + centre crop.

The anyres geometry helpers (`select_best_resolution`, `get_anyres_image_grid_shape`,
`unpad_image`) are shared with the model, which needs the same grid to lay out the features.
"""

from __future__ import annotations

import ast
import base64
import math
import re
from collections.abc import Sequence
from io import BytesIO

import torch
from PIL import Image
from torch import Tensor
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


def load_image_from_base64(image: str) -> Image.Image:
    return Image.open(BytesIO(base64.b64decode(image)))


def _rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"images: expected PIL images, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _edge(size, key: str) -> int:
    """Read `key` from a processor size spec (dict, SizeDict or int)."""
    if isinstance(size, int):
        return size
    value = size[key] if isinstance(size, dict) else getattr(size, key, None)
    if value is None:
        raise ValueError(f"image processor size {size!r} has no {key!r}")
    return int(value)


def crop_size(image_processor) -> int:
    """Side of the square crops the vision tower takes (e.g. 336)."""
    return _edge(image_processor.crop_size, "height")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Pad the shorter side symmetrically so the image becomes square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def parse_grid_pinpoints(grid_pinpoints, patch_size: int | None = None) -> list[tuple[int, int]]:
    """`image_grid_pinpoints` as a list of (width, height).

    Accepts a list of pairs (LLaVA-1.6 configs), its string form, or the range form
    "(1x1),...,(3x3)" (grid cells, multiplied by `patch_size`).
    """
    if isinstance(grid_pinpoints, str):
        if "x" in grid_pinpoints and "..." in grid_pinpoints:
            cells = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)]
            if len(cells) != 2 or patch_size is None:
                raise ValueError(f"image_grid_pinpoints={grid_pinpoints!r}: expected '(AxB),...,(CxD)' and a patch size")
            (a0, b0), (a1, b1) = cells
            return [(i * patch_size, j * patch_size) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
        grid_pinpoints = ast.literal_eval(grid_pinpoints)
    try:
        pairs = [(int(w), int(h)) for w, h in grid_pinpoints]
    except (TypeError, ValueError):
        raise ValueError(f"image_grid_pinpoints={grid_pinpoints!r}: expected a list of [width, height] pairs") from None
    if not pairs or any(w <= 0 or h <= 0 for w, h in pairs):
        raise ValueError(f"image_grid_pinpoints={grid_pinpoints!r}: expected positive [width, height] pairs")
    return pairs


def select_best_resolution(original_size: Sequence[int], possible_resolutions) -> tuple[int, int]:
    """The (width, height) among `possible_resolutions` that shows most of the image.

    Each candidate is scored by the pixels the image keeps when scaled to fit it (capped at
    the original pixel count); ties go to the candidate that wastes the least area.
    """
    width, height = original_size
    best, best_kept, best_waste = None, -1, math.inf
    for cand_w, cand_h in possible_resolutions:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cand_w, cand_h), kept, waste
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: Sequence[int]) -> Image.Image:
    """Resize keeping the aspect ratio to fit (width, height), centred on black padding."""
    width, height = image.size
    target_w, target_h = target_resolution
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Square crops of `patch_size`, row by row."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(image_size: Sequence[int], grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """(crops across, crops down) of the anyres grid for an image of (width, height)."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def process_anyres_image(image: Image.Image, processor, grid_pinpoints) -> Tensor:
    """(1 + crops, 3, S, S): the whole image resized to S x S, then the grid crops."""
    side = crop_size(processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, side))
    crops = divide_to_patches(resize_and_pad_image(image, best), side)
    base_side = _edge(processor.size, "shortest_edge")
    whole = image.resize((base_side, base_side))
    return torch.stack([processor.preprocess(p, return_tensors="pt")["pixel_values"][0] for p in [whole, *crops]])


def unpad_image(tensor: Tensor, original_size: Sequence[int]) -> Tensor:
    """Drop the rows (or columns) of a (C, H, W) feature grid that cover anyres padding.

    `original_size` is the image's (width, height). The padding was added on both sides of
    the shorter dimension when the image was fitted into the grid resolution.
    """
    orig_w, orig_h = original_size
    cur_h, cur_w = tensor.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:  # wider than the grid: padding above and below
        scale = cur_w / orig_w
        pad = (cur_h - int(orig_h * scale)) // 2
        return tensor[:, pad : cur_h - pad, :]
    scale = cur_h / orig_h
    pad = (cur_w - int(orig_w * scale)) // 2
    return tensor[:, :, pad : cur_w - pad]


def process_images(images, image_processor, model_cfg):
    """Pixel tensors for the model from PIL images (any mode: grayscale, RGBA ... become RGB).

    Returns (N, 3, S, S) for "pad" and the default; for "anyres" (N, 1 + crops, 3, S, S) when
    all images have the same number of crops, else a list of (1 + crops_i, 3, S, S).
    """
    images = [_rgb(image) for image in images]
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect == "pad":
        background = tuple(int(255 * c) for c in image_processor.image_mean)
        processed = [
            image_processor.preprocess(expand2square(image, background), return_tensors="pt")["pixel_values"][0]
            for image in images
        ]
    elif aspect == "anyres":
        processed = [process_anyres_image(image, image_processor, model_cfg.image_grid_pinpoints) for image in images]
    else:
        return image_processor(images, return_tensors="pt")["pixel_values"]
    if all(x.shape == processed[0].shape for x in processed):
        return torch.stack(processed)
    return processed


def _drops_leading_space(tokenizer) -> bool:
    """Whether `tokenizer` folds a text's leading space into its word-boundary prefix.

    The original LLaVA ran the slow sentencepiece `LlamaTokenizer`, which always puts the "▁"
    prefix before a text, also when the text starts with a space: " A" -> "▁", "▁A". The Llama
    tokenizers of transformers 5 (and the fast ones of 4.x with legacy=False) prepend "▁" only
    when the text does not already start with one: " A" -> "▁A", the same ids as "A".
    """
    return tokenizer(" a", add_special_tokens=False).input_ids == tokenizer("a", add_special_tokens=False).input_ids


def _chunk_ids(tokenizer, chunk: str, fold_space: bool) -> list[int]:
    """`tokenizer(chunk).input_ids` as the original's sentencepiece tokenizer gives them."""
    if fold_space and chunk.startswith((" ", "\u2581")):
        chunk = " " + chunk  # "▁" + "▁..." after the tokenizer's own space handling
    return tokenizer(chunk).input_ids


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Token ids of `prompt` with `image_token_index` where each "<image>" is, as the original LLaVA gives them.

    The prompt is split at every "<image>" and each piece is tokenised on its own (with the
    tokenizer's BOS, and sentencepiece's word-boundary prefix at the piece's start). When the
    first piece starts with BOS, the result is that BOS, then every piece without its first id,
    one `image_token_index` between consecutive pieces; otherwise the pieces are joined as they
    are. A piece that starts with a space keeps that space as its own "▁" after the prefix, as
    the original's slow `LlamaTokenizer` does ("<image> <image>" -> BOS, image, "▁", "▁",
    image), also with the transformers 5 Llama tokenizers, which would fold the two into one.

    Returns a list of ints, or a (L,) long tensor for `return_tensors="pt"`.
    """
    chunks = prompt.split(DEFAULT_IMAGE_TOKEN)
    fold_space = any(chunk.startswith((" ", "\u2581")) for chunk in chunks) and _drops_leading_space(tokenizer)
    pieces = [_chunk_ids(tokenizer, chunk, fold_space) for chunk in chunks]
    bos = tokenizer.bos_token_id
    skip = 1 if bos is not None and pieces[0][:1] == [bos] else 0
    ids: list[int] = [bos] if skip else []
    for i, piece in enumerate(pieces):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(piece[skip:])
    if return_tensors is None:
        return ids
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None are supported")


def get_model_name_from_path(model_path: str) -> str:
    """'.../llava-v1.5-7b' -> 'llava-v1.5-7b'; '.../run/checkpoint-100' -> 'run_checkpoint-100'."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop generation once every sequence ends with one of `keywords` (e.g. "</s>", "###").

    Works with `model.generate`, which returns only the new tokens: `input_ids` is the prompt,
    used to skip it when the outputs contain it.
    """

    def __init__(self, keywords: list[str], tokenizer, input_ids: Tensor):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if ids[:1] == [tokenizer.bos_token_id] and len(ids) > 1:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.max_keyword_len = max((len(ids) for ids in self.keyword_ids), default=1)
        self.start_len = input_ids.shape[1]

    def _done(self, output_ids: Tensor) -> bool:
        start = self.start_len if output_ids.shape[0] > self.start_len else 0
        new = output_ids[start:]
        if new.numel() == 0:
            return False
        for ids in self.keyword_ids:
            if new.shape[0] >= ids.shape[0] and torch.equal(new[-ids.shape[0] :].cpu(), ids):
                return True
        tail = self.tokenizer.decode(new[-(self.max_keyword_len + 2) :], skip_special_tokens=True)
        return any(keyword in tail for keyword in self.keywords)

    def __call__(self, output_ids: Tensor, scores=None, **kwargs) -> Tensor:
        return torch.tensor([self._done(row) for row in output_ids], dtype=torch.bool, device=output_ids.device)
