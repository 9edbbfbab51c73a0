"""vLLM's Qwen3-VL (`Qwen3VLForConditionalGeneration`) with OTPrune before the LLM, positions kept.

Each image's merged tokens are one token set; the selection sees the main merger output (the
first `out_hidden_size` columns of the tower's rows) and the same indices keep the DeepStack
features (the remaining columns of the same rows, which vLLM's `embed_input_ids` hands to the
LLM's first layers), so the kept tokens' DeepStack planes travel with them. Every kept token
keeps its unpruned (t, h, w) M-RoPE position (`otprune.serve._mrope`). Videos are not pruned (a
pruning request with a video is refused). Registered by `otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve._common import PruneInfoMixin, PruneMainStepMixin
from otprune.serve._mrope import MRopeModelMixin, MRopeProcessorMixin


class OTPruneQwen3VLProcessingInfo(PruneInfoMixin, Qwen3VLProcessingInfo):
    # vLLM's own budget: images are counted unpruned (T) there, videos as vLLM counts them
    get_mm_max_tokens_per_item = Qwen3VLProcessingInfo.get_mm_max_tokens_per_item


class OTPruneQwen3VLMultiModalProcessor(PruneMainStepMixin, MRopeProcessorMixin, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen3VLMultiModalProcessor, info=OTPruneQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class OTPruneQwen3VLForConditionalGeneration(MRopeModelMixin, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # the selection sees the main merger output, not the DeepStack columns
        self.otprune_select_columns = int(self.config.vision_config.out_hidden_size)
        self.otprune_setup()
