"""vLLM's LLaVA-1.5 (`LlavaForConditionalGeneration`, CLIP/SigLIP tower) with OTPrune before the LLM.

Registered by `otprune.serve.register()` under vLLM's architecture name; imports vLLM.
Pixtral-HF checkpoints (same architecture name, Pixtral tower) are refused while pruning.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve._common import PruneInfoMixin, PruneModelMixin, PruneProcessorMixin


class OTPruneLlavaProcessingInfo(PruneInfoMixin, LlavaProcessingInfo):
    pass


class OTPruneLlavaMultiModalProcessor(PruneProcessorMixin, LlavaMultiModalProcessor):
    def otprune_token_counts(self, processed) -> list[int]:
        # Every image is resized to the tower's square crop: the same T for all.
        total = int(self.info.get_max_image_tokens())
        return [total] * len(processed["pixel_values"])


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
class OTPruneLlavaForConditionalGeneration(PruneModelMixin, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
