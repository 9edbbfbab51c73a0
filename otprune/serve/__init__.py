"""OTPrune for vLLM: a `vllm.general_plugins` plugin (`pip install 'otprune[serve]'`).

    BASELINE=OURS SUBSET_RATIO=0.098 vllm serve llava-hf/llava-1.5-7b-hf

vLLM loads the entry point `otprune = "otprune.serve:register"` in every process it starts
(front end, engine core, workers); `register()` puts pruning-aware versions of vLLM's own
LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`)
classes under vLLM's architecture names, so a checkpoint of either runs through them:

- the multimodal processor inserts K = round(r * T) image placeholders per image instead of
  vLLM's T (r = the engine's `SUBSET_RATIO`, or the request's `mm_processor_kwargs`
  key `otprune_ratio`); each image's (T, K) travels to the model as the per-item field
  `otprune_keep`;
- the model's `embed_multimodal` runs vLLM's own vision tower and projector (T rows per image,
  for LLaVA-NeXT the whole anyres set with its newline rows), keeps K rows with
  `otprune.select_tokens` (in the order `OTPRUNE_ORDER` asks for) and returns exactly K rows:
  the row count is asserted against the placeholders the processor inserted (vLLM would
  otherwise use the first rows silently).

Switches (read at engine start, in every vLLM process): `BASELINE` (a selection method of
`otprune.METHODS`), `SUBSET_RATIO`, `OTPRUNE_GAMMA`, `OTPRUNE_SEED`, `OTPRUNE_ORDER`;
`LAYER_INDEX` may only be 0 (the plugin prunes the image embeddings before the LLM) and the
in-LLM methods (FASTV, VTW, FITPRUNE) are refused. Without any switch the engine runs unpruned,
and a request may still ask for pruning with `mm_processor_kwargs={"otprune_ratio": r}`.
The request key is part of vLLM's multimodal hash (processor cache, encoder cache and
prefix-cache blocks), so requests with different ratios never share an image's tokens.

vLLM's built-in classes stay reachable under `VllmLlavaForConditionalGeneration` /
`VllmLlavaNextForConditionalGeneration` (`hf_overrides={"architectures": [...]}`).
Qwen2.5-VL: refused when pruning is asked for (see `otprune.serve.qwen2_5_vl`).

This module does not import vLLM; only `register()` and the model modules do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import otprune
from otprune.config import PruneConfig, check_before_llm

LOGGER = logging.getLogger("otprune")

# The per-request key of `mm_processor_kwargs` (a ratio in (0, 1]).
REQUEST_KEY = "otprune_ratio"
# The per-image field the processor hands to the model: (T, K) = (tokens before, kept).
FIELD = "otprune_keep"

# vLLM architecture name -> our class ("module:Class", imported lazily by vLLM).
MODELS: dict[str, str] = {
    "LlavaForConditionalGeneration": "otprune.serve.llava:OTPruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "otprune.serve.llava_next:OTPruneLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "otprune.serve.qwen2_5_vl:OTPruneQwen2_5_VLForConditionalGeneration",
}
# Aliases that keep vLLM's own (unpruned) classes reachable beside ours.
BUILTINS: dict[str, str] = {
    "VllmLlavaForConditionalGeneration": "vllm.model_executor.models.llava:LlavaForConditionalGeneration",
    "VllmLlavaNextForConditionalGeneration": "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration",
    "VllmQwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
}
# Our classes under names of their own as well (e.g. for hf_overrides in tests and benchmarks).
ALIASES: dict[str, str] = {f"OTPrune{arch}": target for arch, target in MODELS.items()}


def register() -> None:
    """The `vllm.general_plugins` entry point: register our model classes with vLLM."""
    from vllm import ModelRegistry

    for table in (MODELS, BUILTINS, ALIASES):
        for arch, target in table.items():
            ModelRegistry.register_model(arch, target)


def engine_config(environ: Mapping[str, str] | None = None) -> PruneConfig:
    """The engine's pruning from the environment (`PruneConfig.from_env`), checked for vLLM.

    Pruning off (no switch set) is allowed: requests may still ask for a ratio. Pruning inside
    the LLM (`LAYER_INDEX` > 0, FASTV, VTW, FITPRUNE) raises ValueError.
    """
    config = check_before_llm(PruneConfig.from_env(environ), "otprune vLLM plugin", "otprune.hf or our llava package")
    cls = config.method_class()
    if config.enabled and (config.merging or getattr(cls, "needs_instruction", False)):
        what = ("merges tokens inside the vision tower (its CLS attention)" if config.merging
                else "scores the tokens against each prompt's instruction with the CLIP text tower")
        raise ValueError(
            f"otprune vLLM plugin: BASELINE={config.method.upper()} {what}, which the plugin does not wire yet; run it with "
            "our llava package (and otprune.hf for the CLIP-tower merges), or pick a selection method: "
            + ", ".join(m.upper() for m in otprune.METHODS if not getattr(otprune.METHODS[m], "needs_instruction", False))
        )
    return config


def parse_ratio(value: object) -> float:
    """A request's `otprune_ratio` as a float in (0, 1] (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{REQUEST_KEY}={value!r}: must be a number in (0, 1], e.g. 0.098")
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError(f"{REQUEST_KEY}={value!r}: must be a number in (0, 1], e.g. 0.098") from None
    if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ValueError(f"{REQUEST_KEY}={value!r}: must be a number in (0, 1], e.g. 0.098")
    return ratio


def request_ratio(engine: PruneConfig, value: object = None) -> float:
    """The ratio one request runs at: its `otprune_ratio`, else the engine's (1.0 when off)."""
    if value is not None:
        return parse_ratio(value)
    return float(engine.ratio) if engine.enabled else 1.0


def request_config(engine: PruneConfig, value: object = None) -> PruneConfig:
    """The pruning one request runs with: the engine's, at the request's `otprune_ratio` when given
    (a ratio of 1.0 on an engine without switches: unpruned, `engine` itself)."""
    if value is None:
        return engine
    ratio = parse_ratio(value)
    if not engine.enabled and ratio == 1.0:
        return engine
    return PruneConfig(method=engine.method, layer=0, ratio=ratio, order=engine.order, params=engine.params)


__all__ = ["ALIASES", "BUILTINS", "FIELD", "MODELS", "REQUEST_KEY", "engine_config", "parse_ratio", "register", "request_config", "request_ratio"]
