"""vLLM's Gemma 3 (`Gemma3ForConditionalGeneration`, vLLM's `gemma3_mm`) with OTPrune before the LLM.

Gemma 3 writes each image's `mm_tokens_per_image` tokens (256 for the released models) as ONE run
`<start_of_image>` + T x `<image_soft_token>` + `<end_of_image>`; as in `otprune.hf`'s Gemma 3
adapter each image is one token set, K = round(r * T) kept, the run becomes K placeholders (the
`<start_of_image>` / `<end_of_image>` text rows stay), positions are 1-D and consecutive.

Attention inside an image: Gemma 3 lets the tokens of one image attend to each other both ways.
vLLM derives that block from the placeholder's embedding range, which after pruning is exactly the
K kept rows (what `otprune.hf` does with `token_type_ids`), on attention backends that support it
(`supports_mm_prefix()`). vLLM 0.32's CPU backend does not: there vLLM's own Gemma 3 attends
causally inside every image, pruned or not (measured: its prompt log-probs equal transformers' with
`token_type_ids` zeroed within 1e-6 and differ from transformers' bidirectional ones by up to 0.37
on the tiny checkpoint, `tests/serve/test_serve_gemma3.py`). The plugin keeps vLLM's attention as
it is (ratio 1 equals vLLM's class) and logs a warning at start on such a backend: pruned outputs
then equal `otprune.hf` run with a causal mask inside the image, not with Gemma 3's bidirectional
one. GPU backends are not tested here.

Not pruned: pan-and-scan crops (`do_pan_and_scan`, off by default; each crop is its own image
block): a request that prunes an image with crops is refused. Registered by
`otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve import FIELD, LOGGER, REQUEST_KEY, request_ratio
from otprune.serve._common import (
    PruneInfoMixin,
    PruneModelMixin,
    PruneProcessorMixin,
    PruneRunMixin,
    _without_key,
)

CAUSAL_WARNING = (
    "otprune: vLLM's attention backend here ({backend}) has no bidirectional multimodal-prefix attention "
    "(supports_mm_prefix() False): Gemma 3's image tokens attend causally inside each image, pruned or not, unlike "
    "transformers' Gemma 3; pruned outputs equal otprune.hf with a causal mask inside the image"
)


class OTPruneGemma3ProcessingInfo(PruneInfoMixin, Gemma3ProcessingInfo):
    def get_max_image_tokens(self) -> int:
        """T of the largest image (pan-and-scan crops included), in vLLM's count."""
        size = self.get_image_size_with_most_features()
        processor = self.get_hf_processor()
        return int(self.get_num_image_tokens(image_width=size.width, image_height=size.height, processor=processor,
                                             mm_kwargs={}))  # fmt: skip


class OTPruneGemma3MultiModalProcessor(PruneRunMixin, PruneProcessorMixin, Gemma3MultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        # vLLM's (our request key left out); the counts need `num_patches`, added in the post-processing below
        return Gemma3MultiModalProcessor._call_hf_processor(self, hf_data, _without_key(hf_kwargs))

    def _postprocess_hf_mm_data(self, mm_data: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object], processed_data):
        processed = super()._postprocess_hf_mm_data(mm_data, _without_key(hf_processor_mm_kwargs), processed_data)
        return self.otprune_add_counts(processed, hf_processor_mm_kwargs)

    def otprune_token_counts(self, processed) -> list[int]:
        """T per image: its crops (`num_patches`: the image plus its pan-and-scan crops) x `image_seq_length`."""
        per_crop = int(self.info.get_hf_processor().image_seq_length)
        return [int(crops) * per_crop for crops in processed["num_patches"].tolist()]

    def otprune_image_tokens(self, width: int, height: int) -> int:
        processor = self.info.get_hf_processor()
        return int(self.info.get_num_image_tokens(image_width=width, image_height=height, processor=processor, mm_kwargs={}))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        """vLLM's updates (`<start_of_image>` + T x `<image_soft_token>` + `<end_of_image>` per image), each
        image's run cut to its K; an image with pan-and-scan crops is refused when the request prunes."""
        ratio = request_ratio(self.info.otprune_engine_config(), hf_processor_mm_kwargs.get(REQUEST_KEY))
        per_image = int(self.info.get_hf_processor().image_seq_length)
        if ratio < 1.0:
            for index, item in enumerate(out_mm_kwargs.get("image", [])):
                if item is not None and FIELD in item and int(item[FIELD].data[0]) != per_image:
                    raise ValueError(
                        f"otprune: image {index} has pan-and-scan crops ({int(item[FIELD].data[0]) // per_image - 1}); "
                        f"the plugin does not prune them (ratio {ratio}): send it with {REQUEST_KEY}=1.0, or without "
                        "do_pan_and_scan"
                    )
        updates = Gemma3MultiModalProcessor._get_prompt_updates(  # vLLM's, not the LLaVA-style mixin's
            self, mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs)
        return self.otprune_cut_runs(updates, mm_items, out_mm_kwargs, ratio, int(self.info.get_hf_config().image_token_index))


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneGemma3MultiModalProcessor, info=OTPruneGemma3ProcessingInfo, dummy_inputs=Gemma3DummyInputsBuilder
)
class OTPruneGemma3ForConditionalGeneration(PruneModelMixin, Gemma3ForConditionalGeneration):
    """Each image's rows are one token set; the bidirectional block (where the backend has one) is vLLM's."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_setup()
        backend = next((m.attn_backend for m in self.language_model.modules() if hasattr(m, "attn_backend")), None)
        if backend is not None and not backend.supports_mm_prefix():
            LOGGER.warning(CAUSAL_WARNING.format(backend=backend.get_name()))
