"""vLLM's Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) with OTPrune before the LLM, positions kept.

Each image's merged tokens (the tower's merger output, T = t * h * w / merge^2 rows) are one
token set, as in `otprune.hf.qwen2_5_vl`; K = round(r * T) of them are kept and every kept token
keeps the (t, h, w) M-RoPE position it has unpruned (`otprune.serve._mrope`). Each video is one
token set too (all its frames' merged tokens), K = round(r * T) placeholders, the kept tokens at
their unpruned positions (time positions from the video's `second_per_grid_ts`, as vLLM numbers
them). Registered by `otprune.serve.register()`;
imports vLLM.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve._common import PruneInfoMixin
from otprune.serve._mrope import MRopeModelMixin, MRopeProcessorMixin


class OTPruneQwen2_5_VLProcessingInfo(PruneInfoMixin, Qwen2_5_VLProcessingInfo):
    # vLLM's own budget: images are counted unpruned (T) there, videos as vLLM counts them
    get_mm_max_tokens_per_item = Qwen2_5_VLProcessingInfo.get_mm_max_tokens_per_item


class OTPruneQwen2_5_VLMultiModalProcessor(MRopeProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen2_5_VLMultiModalProcessor, info=OTPruneQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class OTPruneQwen2_5_VLForConditionalGeneration(MRopeModelMixin, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
