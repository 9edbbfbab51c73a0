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

import dataclasses
from collections.abc import Mapping

from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve import FIELD, REQUEST_KEY, request_ratio
from otprune.serve._common import (
    PruneInfoMixin,
    PruneMainStepMixin,
    PruneModelMixin,
    PruneProcessorMixin,
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


class OTPruneInternVLMultiModalProcessor(PruneMainStepMixin, PruneProcessorMixin, InternS1MultiModalProcessor):
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
        from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
        from vllm.multimodal.processing import PromptUpdateDetails

        ratio = request_ratio(self.info.otprune_engine_config(), hf_processor_mm_kwargs.get(REQUEST_KEY))
        self.otprune_refuse_videos(mm_items, ratio)
        updates = InternS1MultiModalProcessor._get_prompt_updates(  # vLLM's, not the LLaVA-style mixin's
            self, mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs)
        context_id = int(self.info.get_hf_processor().image_token_id)

        def pruned(item_idx: int, unpruned) -> PromptUpdateDetails:
            details = unpruned(item_idx)
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                if ratio < 1.0:
                    raise ValueError(
                        f"otprune: image embeddings (image_embeds) cannot be pruned (ratio {ratio}); send images, "
                        f"or run this request with {REQUEST_KEY}=1.0"
                    )
                return details
            ids = list(details.full)
            slots = [index for index, token in enumerate(ids) if token == context_id]
            total, keep = (int(v) for v in out_mm_kwargs["image"][item_idx][FIELD].data)
            if len(slots) != total or slots != list(range(slots[0], slots[0] + total)):
                raise ValueError(
                    f"otprune: image {item_idx}: vLLM's placeholder has {len(slots)} <IMG_CONTEXT> tokens "
                    f"{'' if len(slots) == total else '(not one run) '}but the processor output counts {total}; "
                    "refusing to insert a placeholder count that may not match"
                )
            ids = ids[: slots[0]] + [context_id] * keep + ids[slots[0] + total :]
            return PromptUpdateDetails.select_token_id(ids, context_id)

        return [dataclasses.replace(update, replacement=lambda item_idx, unpruned=update.replacement: pruned(item_idx, unpruned))
                if update.modality == "image" else update for update in updates]  # fmt: skip


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneInternVLMultiModalProcessor, info=OTPruneInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class OTPruneInternVLForConditionalGeneration(PruneModelMixin, InternS1ForConditionalGeneration):
    """Each image's rows (all its tiles, in order) are one token set; video frames pass unpruned."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
