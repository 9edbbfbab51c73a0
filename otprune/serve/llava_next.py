"""vLLM's LLaVA-NeXT (`LlavaNextForConditionalGeneration`, anyres) with OTPrune before the LLM.

Each image's whole anyres set (base crop, unpadded grid crops and their `image_newline` rows,
as vLLM's model merges them) is one token set, pruned jointly, as in `otprune.hf`.
Registered by `otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

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
