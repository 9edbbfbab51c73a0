"""vLLM's LLaVA-NeXT (`LlavaNextForConditionalGeneration`, anyres) with OTPrune before the LLM.

Each image's whole anyres set (base crop, unpadded grid crops and their `image_newline` rows,
as vLLM's model merges them) is one token set, pruned jointly, as in `otprune.hf`.
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


class OTPruneLlavaNextProcessingInfo(PruneInfoMixin, LlavaNextProcessingInfo):
    pass


class OTPruneLlavaNextMultiModalProcessor(PruneProcessorMixin, LlavaNextMultiModalProcessor):
    def otprune_token_counts(self, processed) -> list[int]:
        return counts_from_sizes(self.info, processed["image_sizes"])


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneLlavaNextMultiModalProcessor, info=OTPruneLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class OTPruneLlavaNextForConditionalGeneration(PruneModelMixin, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()

    def _otprune_sizes(self, kwargs) -> list[torch.Tensor]:
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise AssertionError("otprune: CDPruner on LLaVA-NeXT needs each image's size (image_sizes)")
        return [torch.as_tensor(size).reshape(2) for size in sizes]

    def otprune_patches(self, seen, totals, kwargs):
        """Each image's real crops (the base image and its grid; vLLM may pad the crop dimension)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.config
        crops = [int(image_size_to_num_patches(image_size=size.tolist(), grid_pinpoints=config.image_grid_pinpoints,
                                               patch_size=config.vision_config.image_size))
                 for size in self._otprune_sizes(kwargs)]  # fmt: skip
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
