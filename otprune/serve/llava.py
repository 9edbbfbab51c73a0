"""vLLM's LLaVA-1.5 (`LlavaForConditionalGeneration`, CLIP/SigLIP tower) with OTPrune before the LLM.

Registered by `otprune.serve.register()` under vLLM's architecture name; imports vLLM.
Pixtral-HF checkpoints (same architecture name, Pixtral tower) are refused while pruning.
VisionZip (`BASELINE=VISIONZIP`) merges inside the CLIP tower (`otprune.serve._tower`); a SigLIP
tower refuses it when the model loads.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve._common import PruneInfoMixin, PruneModelMixin, PruneProcessorMixin
from otprune.serve._tower import TowerMergeMixin


class OTPruneLlavaProcessingInfo(PruneInfoMixin, LlavaProcessingInfo):
    pass


class OTPruneLlavaMultiModalProcessor(PruneProcessorMixin, LlavaMultiModalProcessor):
    def otprune_token_counts(self, processed) -> list[int]:
        # Every image is resized to the tower's square crop: the same T for all.
        total = int(self.info.get_max_image_tokens())
        return [total] * len(processed["pixel_values"])

    def otprune_crop_counts(self, processed) -> list[int]:
        return [1] * len(processed["pixel_values"])  # one CLIP forward per image


def _build_info(ctx):
    from transformers import LlavaConfig, PixtralVisionConfig

    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        raise ValueError(
            "otprune vLLM plugin: a Pixtral-HF checkpoint (LlavaForConditionalGeneration with a Pixtral tower) is not "
            "supported; use hf_overrides={'architectures': ['VllmLlavaForConditionalGeneration']} for vLLM's own class"
        )
    return OTPruneLlavaProcessingInfo(ctx)


def _build_processor(info, dummy_inputs):
    assert not isinstance(info, PixtralHFProcessingInfo)
    return OTPruneLlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class OTPruneLlavaForConditionalGeneration(TowerMergeMixin, PruneModelMixin, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
        self.otprune_tower_setup()

    def otprune_embed_merged(self, counts: list[list[int]], kwargs: dict):
        """VisionZip: each image is one crop; K merged rows per image, or vLLM's T rows when K == T."""
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":  # image_embeds: never pruned (the processor refuses it)
            return self._process_image_input(image_input)
        pixels = image_input["pixel_values"]
        pixels = torch.stack(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
        patches, hidden, q_cls, keys = self.otprune_tower(pixels)  # (B, N, C), (B, 1 + N, C), (B, C), (B, 1 + N, C)
        if len(counts) != patches.shape[0]:
            raise AssertionError(f"otprune: {patches.shape[0]} images embedded but {len(counts)} token counts")
        projected = None
        out = []
        for i, (total, keep) in enumerate(counts):
            if patches.shape[1] != total:
                raise AssertionError(f"otprune: the vision tower gave {patches.shape[1]} rows for an image the processor "
                                     f"counted {total} tokens for")
            if keep == total:  # ratio 1: vLLM's own rows
                projected = self.multi_modal_projector(patches) if projected is None else projected
                out.append(projected[i])
                continue
            rows, sources = self.otprune_merge(hidden[i:i + 1], q_cls[i:i + 1], keys[i:i + 1], keep)
            self.otprune_note(rows, sources, total, keep)
            out.append(rows)
        return out
