"""vLLM's Qwen3-VL (`Qwen3VLForConditionalGeneration`) with OTPrune before the LLM, positions kept.

Each image's merged tokens are one token set; the selection sees the main merger output (the
first `out_hidden_size` columns of the tower's rows) and the same indices keep the DeepStack
features (the remaining columns of the same rows, which vLLM's `embed_input_ids` hands to the
LLM's first layers), so the kept tokens' DeepStack planes travel with them. Every kept token
keeps its unpruned (t, h, w) M-RoPE position (`otprune.serve._mrope`).

Videos: each video is one token set (all its frames' merged tokens, T = t * h * w / merge^2), as
in `otprune.hf.qwen3_vl`. vLLM lays a video out per frame, `<t seconds><|vision_start|>` + the
frame's tokens + `<|vision_end|>`; pruned, each frame keeps its timestamp and markers and the kept
tokens that belong to it. How many that is per frame is known only after the selection, so the
processor inserts the pruned region with all K placeholders in the first frame (vLLM's EVS
layout, the same length) as embeddings throughout, and the model fills it in the real layout:
the timestamp / marker rows with the language model's embeddings of those tokens (DeepStack zero
there), the kept rows in their frames. Registered by `otprune.serve.register()`; imports vLLM.
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
    def otprune_video_replacement(self, item, total: int, keep: int):
        """The pruned video's region, all of it embeddings: per frame its timestamp and markers, the K
        placeholders in the first frame (the model puts each kept token in its own frame)."""
        config = self.info.get_hf_config()
        frames = int(item["video_grid_thw"].data[0])
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[keep] + [0] * (frames - 1), timestamps=item["timestamps"].data,
            tokenizer=self.info.get_tokenizer(), vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id, select_token_id=False,
        )  # fmt: skip


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen3VLMultiModalProcessor, info=OTPruneQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class OTPruneQwen3VLForConditionalGeneration(MRopeModelMixin, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # the selection sees the main merger output, not the DeepStack columns
        self.otprune_select_columns = int(self.config.vision_config.out_hidden_size)
        self.otprune_setup()

    def otprune_region_tokens(self, modality: str, item: dict) -> list[int]:
        """A video's unpruned region: per frame `<t seconds><|vision_start|>` + its tokens + `<|vision_end|>`
        (vLLM's own layout, `Qwen3VLMultiModalProcessor.get_video_repl`)."""
        if modality != "video":
            return super().otprune_region_tokens(modality, item)
        merge = int(self.config.vision_config.spatial_merge_size)
        grid_t, grid_h, grid_w = item["grid"]
        if item.get("timestamps") is None or len(item["timestamps"]) != grid_t:
            raise AssertionError(f"otprune: a video of {grid_t} frames has timestamps {item.get('timestamps')}")
        return list(Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[grid_h * grid_w // (merge * merge)] * grid_t, timestamps=item["timestamps"],
            tokenizer=self._tokenizer, vision_start_token_id=self.config.vision_start_token_id,
            vision_end_token_id=self.config.vision_end_token_id, video_token_id=self.config.video_token_id,
            select_token_id=True,
        ).full)  # fmt: skip
