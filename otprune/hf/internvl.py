"""OTPrune on transformers' own, unmodified `InternVLForConditionalGeneration` (InternVL 3 / 3.5
in the HF format, e.g. OpenGVLab/InternVL3-8B-hf), layer 0.

    from otprune import hf
    adapter = hf.apply(model, otprune.PruneConfig(method="otprune", layer=0, ratio=0.25))
    out = model.generate(**processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                         return_tensors="pt", add_generation_prompt=True))

InternVL splits an image into tiles (dynamic resolution: up to `max_patches` 448 px crops plus a
thumbnail); each tile gives 256 tokens (InternViT, CLS dropped, pixel shuffle 0.5, MLP
projector), written into `<IMG_CONTEXT>` placeholders: one image is ONE run
`<img>` + 256 x tiles x `<IMG_CONTEXT>` + `</img>`.

Per image, not per tile: the token set of an image is all its tiles' tokens (thumbnail
included), as one run of placeholders; it keeps K_i = round(ratio * T_i) of its T_i = 256 x tiles
tokens, so the selection sees the whole image (a method may keep more of one tile than of
another). A video is processed by InternVL as frames, each its own `<img>` run of one tile:
each frame is one token set.

The adapter is the LLaVA family's (`otprune.hf.llava.LlavaFamilyAdapter`: it wraps the inner
model's `forward` on the instance, ONE batched selection for all images of a batch, the pruned
placeholder rows leave the sequence, text rows (`<img>`, `</img>` included) never do, positions
0..n'_b - 1 on the compact sequence, decoding continues on the pruned cache). PruMerge's CLS
attention is not wired for InternViT: PruMerge / PruMerge+ / `SUBSET_RATIO=iqr` are refused.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from otprune.hf.llava import LlavaFamilyAdapter


def placeholder_runs(input_ids: Tensor, token_id: int) -> list[int]:
    """input_ids: (B, L) -> the lengths of the runs of `token_id`, in row-major order (a run never
    crosses a row)."""
    hits = input_ids == token_id  # (B, L)
    previous = torch.nn.functional.pad(hits, (1, 0))[:, :-1]
    starts = (hits & ~previous).reshape(-1)
    run = starts.long().cumsum(0) - 1  # (B * L,) run index of every row
    return torch.bincount(run[hits.reshape(-1)], minlength=int(starts.sum())).tolist()


class InternVLAdapter(LlavaFamilyAdapter):
    """`InternVLForConditionalGeneration`: one token set per image (all its tiles) or video frame."""

    family: ClassVar[str] = "internvl"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)

    def visual_sets(self, inner, kwargs: dict) -> list[tuple[int, list[Tensor]]]:
        encoded = self._encoded(kwargs, "image")
        if encoded is None and kwargs.get("pixel_values") is not None:
            encoded = inner.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        if encoded is None:
            return []
        token_id = int(inner.config.image_token_id)
        tiles = encoded.pooler_output  # (tiles, T, D)
        tokens = tiles.reshape(-1, tiles.shape[-1])  # every tile's tokens, in order
        runs = placeholder_runs(kwargs["input_ids"], token_id)
        if sum(runs) != tokens.shape[0]:
            raise ValueError(
                f"input_ids: {sum(runs)} <IMG_CONTEXT> placeholders (id {token_id}) in {len(runs)} images, but the "
                f"{tiles.shape[0]} tiles give {tokens.shape[0]} tokens; build the prompt with the model's processor"
            )
        return [(token_id, list(tokens.split(runs)))]


__all__ = ["InternVLAdapter", "placeholder_runs"]
