"""vLLM's LLaVA-NeXT (`LlavaNextForConditionalGeneration`, anyres) with OTPrune before the LLM.

Each image's whole anyres set (base crop, unpadded grid crops and their `image_newline` rows,
as vLLM's model merges them) is one token set, pruned jointly, as in `otprune.hf`.
VisionZip (`BASELINE=VISIONZIP`) merges each anyres crop on its own inside the CLIP tower
(`otprune.serve._tower`): an image's rows are its crops' merged rows in crop order (base crop
first; no unpadding, no newline rows), as in our llava and `otprune.hf`.
Registered by `otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve._common import PruneInfoMixin, PruneModelMixin, PruneProcessorMixin, counts_from_sizes
from otprune.serve._tower import TowerMergeMixin


def anyres_crops(hf_config, image_sizes) -> list[int]:
    """CLIP crops per image (base + grid) from (height, width) rows, as transformers counts them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [int(image_size_to_num_patches(image_size=[int(v) for v in size], grid_pinpoints=hf_config.image_grid_pinpoints,
                                          patch_size=hf_config.vision_config.image_size))
            for size in image_sizes]  # fmt: skip


class OTPruneLlavaNextProcessingInfo(PruneInfoMixin, LlavaNextProcessingInfo):
    pass


class OTPruneLlavaNextMultiModalProcessor(PruneProcessorMixin, LlavaNextMultiModalProcessor):
    def otprune_token_counts(self, processed) -> list[int]:
        return counts_from_sizes(self.info, processed["image_sizes"])

    def otprune_crop_counts(self, processed) -> list[int]:
        return anyres_crops(self.info.get_hf_config(), processed["image_sizes"])


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneLlavaNextMultiModalProcessor, info=OTPruneLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class OTPruneLlavaNextForConditionalGeneration(TowerMergeMixin, PruneModelMixin, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
        self.otprune_tower_setup()

    def otprune_embed_merged(self, counts: list[list[int]], kwargs: dict):
        """VisionZip per anyres crop; an image at K == T gets vLLM's own anyres rows."""
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":  # image_embeds: never pruned (the processor refuses it)
            return self._process_image_input(image_input)
        pixels = image_input["pixel_values"]  # (B, P, 3, H, W) (crops maybe padded) or per image (P_i, 3, H, W)
        sizes = image_input.get("image_sizes")
        if sizes is None:
            raise ValueError("otprune: image_sizes missing; VisionZip counts LLaVA-NeXT's anyres crops from them")
        crops = anyres_crops(self.config, sizes)
        if len(counts) != len(crops):
            raise AssertionError(f"otprune: {len(crops)} images embedded but {len(counts)} token counts")
        stacked = torch.cat([image[:c] for image, c in zip(pixels, crops, strict=True)])  # (sum crops, 3, H, W)
        patches, hidden, q_cls, keys = self.otprune_tower(stacked)
        out, start = [], 0
        for i, ((total, keep), c) in enumerate(zip(counts, crops, strict=True)):
            crop = slice(start, start + c)
            start += c
            if keep == total:  # ratio 1: vLLM's own anyres rows
                rows = self._merge_image_patch_embeddings(sizes[i], self.multi_modal_projector(patches[crop]),
                                                          strategy="spatial_unpad")  # fmt: skip
                if rows.shape[0] != total:
                    raise AssertionError(f"otprune: vLLM's anyres set has {rows.shape[0]} rows, the processor counted {total}")
                out.append(rows)
                continue
            rows, sources = self.otprune_merge(hidden[crop], q_cls[crop], keys[crop], keep)
            self.otprune_note(rows, sources, total, keep)
            out.append(rows)
        return out

    def _otprune_sizes(self, kwargs) -> list[torch.Tensor]:
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise AssertionError("otprune: CDPruner on LLaVA-NeXT needs each image's size (image_sizes)")
        return [torch.as_tensor(size).reshape(2) for size in sizes]

    def otprune_patches(self, seen, totals, kwargs):
        """Each image's real crops (the base image and its grid; vLLM may pad the crop dimension)."""
        crops = anyres_crops(self.config, [size.tolist() for size in self._otprune_sizes(kwargs)])
        rows = torch.cat(seen)  # (crops in the call, N, C)
        if rows.shape[0] == sum(crops):
            return list(rows.split(crops))
        if rows.shape[0] % len(crops):
            raise AssertionError(f"otprune: {rows.shape[0]} crops in the call for images of {crops} crops")
        per_image = rows.view(len(crops), -1, *rows.shape[1:])  # padded to the same crop count
        return [image[:n] for image, n in zip(per_image, crops, strict=True)]

    def otprune_relevance_layout(self, per_crop, kwargs):
        """vLLM's own anyres merge (`_merge_image_patch_embeddings`: base crop, unpadded grid) of the
        per-patch values, run with 1 in the place of `image_newline` (a stand-in object carrying the
        config and that value)."""
        stand_in = SimpleNamespace(config=self.config, image_newline=per_crop[0].new_ones(1))
        merge = LlavaNextForConditionalGeneration._merge_image_patch_embeddings
        return [merge(stand_in, size, r[..., None], strategy="spatial_unpad")[:, 0]
                for size, r in zip(self._otprune_sizes(kwargs), per_crop, strict=True)]  # fmt: skip
