"""vLLM's LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, anyres-max) with OTPrune before the LLM.

Each image's whole anyres set (base crop, unpadded grid crops and their `image_newline` rows, as
vLLM's model merges them) is one token set, pruned jointly, as in `otprune.hf`'s OneVision
adapter. Videos are not pruned: a request that prunes (ratio < 1) and holds a video is refused
(send it with `otprune_ratio=1.0`). Registered by `otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve import REQUEST_KEY, request_ratio
from otprune.serve._common import (
    PruneInfoMixin,
    PruneMainStepMixin,
    PruneModelMixin,
    PruneProcessorMixin,
    _without_key,
    counts_from_sizes,
)


class OTPruneLlavaOnevisionProcessingInfo(PruneInfoMixin, LlavaOnevisionProcessingInfo):
    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """Images unpruned (T: the tower runs on T; a request may ask for a higher ratio than the
        engine's), videos as vLLM counts them; only the modalities the engine accepts."""
        counts = {"image": lambda: self.get_max_image_tokens(), "video": lambda: self.get_max_video_tokens(seq_len, mm_counts)}
        return {modality: int(count()) for modality, count in counts.items() if mm_counts.get(modality, 0) > 0}


class OTPruneLlavaOnevisionMultiModalProcessor(PruneMainStepMixin, PruneProcessorMixin, LlavaOnevisionMultiModalProcessor):
    def otprune_token_counts(self, processed) -> list[int]:
        return counts_from_sizes(self.info, processed["image_sizes"])

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        ratio = request_ratio(self.info.otprune_engine_config(), hf_processor_mm_kwargs.get(REQUEST_KEY))
        self.otprune_refuse_videos(mm_items, ratio)
        images = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # K per image
        videos = [update for update in LlavaOnevisionMultiModalProcessor._get_prompt_updates(
            self, mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs) if update.modality == "video"]  # fmt: skip
        return [*images, *videos]


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneLlavaOnevisionMultiModalProcessor, info=OTPruneLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)  # fmt: skip
class OTPruneLlavaOnevisionForConditionalGeneration(PruneModelMixin, LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
