"""vLLM's InternVL in the HF format (`InternVLForConditionalGeneration`, served by vLLM 0.32's
`interns1.InternS1ForConditionalGeneration`) with OTPrune before the LLM.

InternVL cuts an image into 448 px tiles (up to `max_patches` crops plus a thumbnail), 256 tokens
each, written as ONE run `<img>` + 256 x tiles x `<IMG_CONTEXT>` + `</img>`. As in `otprune.hf`'s
InternVL adapter, one image is one token set: all its tiles' tokens (thumbnail included, in tile
order) are selected jointly, K = round(r * T) of T = 256 x tiles kept (a method may keep more of
one tile than of another), and the run becomes `<img>` + K x `<IMG_CONTEXT>` + `</img>` (the
`<img>` / `</img>` text rows stay). Positions are 1-D: the kept rows take consecutive positions,
as in `otprune.hf`.

Videos (each frame its own one-tile `<img>` run) are not pruned: a request that prunes (ratio < 1)
and holds a video is refused (send it with `otprune_ratio=1.0`). Registered by
`otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve import REQUEST_KEY, request_ratio
from otprune.serve._common import (
    PruneInfoMixin,
    PruneMainStepMixin,
    PruneModelMixin,
    PruneProcessorMixin,
    PruneRunMixin,
    _without_key,
)


class OTPruneInternVLProcessingInfo(PruneInfoMixin, InternS1ProcessingInfo):
    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """Images unpruned (T: the tower runs on T; a request may ask for a higher ratio than the
        engine's), videos as vLLM lays them out (one tile of `image_seq_length` tokens per frame);
        only the modalities the engine accepts."""
        counts = {
            "image": lambda: self.get_max_image_tokens(),
            "video": lambda: self.get_num_frames_with_most_features(seq_len, mm_counts)
            * self.get_hf_processor().image_seq_length,
        }
        return {modality: int(count()) for modality, count in counts.items() if mm_counts.get(modality, 0) > 0}


class OTPruneInternVLMultiModalProcessor(PruneMainStepMixin, PruneRunMixin, PruneProcessorMixin, InternS1MultiModalProcessor):
    def otprune_token_counts(self, processed) -> list[int]:
        """T per image: its tiles (`image_num_patches`, thumbnail included) x `image_seq_length`."""
        per_tile = int(self.info.get_hf_processor().image_seq_length)
        return [int(tiles) * per_tile for tiles in processed["image_num_patches"].tolist()]

    def otprune_image_tokens(self, width: int, height: int) -> int:
        processor = self.info.get_hf_processor()
        return int(self.info.get_num_image_tokens(image_width=width, image_height=height, processor=processor, mm_kwargs={}))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        """vLLM's updates (images: `<img>` + T x `<IMG_CONTEXT>` + `</img>`), each image's run of
        `<IMG_CONTEXT>` cut to its K; videos unchanged (refused when the request prunes)."""
        ratio = request_ratio(self.info.otprune_engine_config(), hf_processor_mm_kwargs.get(REQUEST_KEY))
        self.otprune_refuse_videos(mm_items, ratio)
        updates = InternS1MultiModalProcessor._get_prompt_updates(  # vLLM's, not the LLaVA-style mixin's
            self, mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs)
        return self.otprune_cut_runs(updates, mm_items, out_mm_kwargs, ratio, int(self.info.get_hf_processor().image_token_id))


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneInternVLMultiModalProcessor, info=OTPruneInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class OTPruneInternVLForConditionalGeneration(PruneModelMixin, InternS1ForConditionalGeneration):
    """Each image's rows (all its tiles, in order) are one token set; video frames pass unpruned."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
