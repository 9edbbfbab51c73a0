"""Prefill benchmark: one multimodal forward, unpruned vs pruned before the LLM, on CPU.

For each model family of `otprune.hf` the benchmark builds transformers' own model class with
RANDOM weights, offline, at the real sizes of the LLM (hidden size d, FFN size m, attention and
KV heads of the real model of that width) but only a few decoder layers, and a small vision
tower that still gives the real number of visual tokens per image (its width is tiny, its patch
grid is the real one). One prompt with one image (for Qwen2.5-VL and Qwen3-VL also one with an
8-frame video: `DEFAULT_MEDIA`) is run through the whole model (vision tower, projector, selection,
LLM, the last position's logits) unpruned and with
`otprune.hf.apply(model, PruneConfig(method, layer=0, ratio))`, in paired runs after a warm-up;
the medians are reported together with the time spent inside the LLM alone (forward hooks on
the language model) and the ratio that the paper's FLOPs formula (`otprune.flops`, with the
model's d, m and layer count) predicts for the same token counts.

Pruning at layer 0 gives every decoder layer the same n tokens, so the LLM-only ratio and the
FLOPs ratio do not depend on how many layers are built; the whole-forward ratio does (the
vision tower, the projector and the selection are fixed costs that a 32-layer model dilutes).
The FLOPs formula is the paper's (full multi-head attention, a two-matrix FFN); the real LLMs
have a gated three-matrix FFN, grouped KV heads (Qwen2 / Qwen3, Gemma 3) and, for Qwen3 and Gemma 3,
attention heads whose total width is not d, and a CPU runs the short pruned
sequence's matrix products at a lower rate than the long one's: both show in the gap between
the measured and the predicted ratio.

The tokenizers are the byte-level ones of `otprune.hf.tiny` (text tokens are bytes; the
vocabulary, so the embedding and the last position's logits, is tiny).

Weights are drawn once, cheaply: the model is constructed with transformers' weight
initialisation switched off (`no_init_weights`: parameters are allocated, not filled), then
every parameter is filled in place (matrices and embeddings uniform with std 0.02, norms 1,
biases 0). Buffers (rotary frequencies, position ids) are computed by the constructors as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from otprune import flops
from otprune.config import PruneConfig
from otprune.hf import FAMILIES

# The LLM each family's default checkpoints use: Llama (Vicuna) for LLaVA-1.5 / 1.6, Gemma 3's own,
# Qwen2 / Qwen2.5 otherwise (Qwen3-VL: Qwen3; InternVL3.5: Qwen3, chosen by `LLMSize.text_type`).
_QWEN_LLM = {"onevision", "qwen2_5_vl", "qwen3_vl", "internvl"}


@dataclasses.dataclass(frozen=True)
class LLMSize:
    """Sizes of the decoder that matter for the prefill time.

    Attributes:
        hidden: hidden size d.
        intermediate: FFN size m.
        heads: attention (query) heads.
        kv_heads: key/value heads (= heads without grouped-query attention).
        name: the real model of these sizes, e.g. "LLaVA-1.5-7B", or "" for custom sizes.
        real_layers: the real model's decoder layers (0 when unknown).
        head_size: the attention head size when it is not hidden / heads (Qwen3, Gemma 3: 128 / 256);
            0 = hidden / heads.
        text_type: the decoder's transformers `model_type` when it is not the family's usual one
            (InternVL3.5: "qwen3"); "" = the family's.
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    name: str = ""
    real_layers: int = 0
    head_size: int = 0
    text_type: str = ""

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def label(self) -> str:
        heads = f"{self.heads} head{'s' if self.heads > 1 else ''}"
        if self.kv_heads != self.heads:
            heads += f" ({self.kv_heads} KV)"
        if self.head_size and self.head_size * self.heads != self.hidden:
            heads += f" of {self.head_size}"
        return f"d={self.hidden}, m={self.intermediate}, {heads}"


# family -> hidden size -> the real LLM of that width (the published config.json's text_config:
# hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers, head_dim).
KNOWN_SIZES: dict[str, dict[int, LLMSize]] = {
    "llava": {
        4096: LLMSize(4096, 11008, 32, 32, "LLaVA-1.5-7B", 32),
        5120: LLMSize(5120, 13824, 40, 40, "LLaVA-1.5-13B", 40),
    },
    "llava_next": {
        4096: LLMSize(4096, 11008, 32, 32, "LLaVA-1.6-Vicuna-7B", 32),
        5120: LLMSize(5120, 13824, 40, 40, "LLaVA-1.6-Vicuna-13B", 40),
        7168: LLMSize(7168, 20480, 56, 8, "LLaVA-1.6-34B", 60),
    },
    "onevision": {
        896: LLMSize(896, 4864, 14, 2, "LLaVA-OneVision-0.5B", 24),
        3584: LLMSize(3584, 18944, 28, 4, "LLaVA-OneVision-7B", 28),
        8192: LLMSize(8192, 29568, 64, 8, "LLaVA-OneVision-72B", 80),
    },
    "qwen2_5_vl": {
        2048: LLMSize(2048, 11008, 16, 2, "Qwen2.5-VL-3B", 36),
        3584: LLMSize(3584, 18944, 28, 4, "Qwen2.5-VL-7B", 28),
        5120: LLMSize(5120, 27648, 40, 8, "Qwen2.5-VL-32B", 64),
        8192: LLMSize(8192, 29568, 64, 8, "Qwen2.5-VL-72B", 80),
    },
    "qwen3_vl": {  # Qwen3 LLMs: head size 128 whatever the width
        2048: LLMSize(2048, 6144, 16, 8, "Qwen3-VL-2B", 28, 128),
        2560: LLMSize(2560, 9728, 32, 8, "Qwen3-VL-4B", 36, 128),
        4096: LLMSize(4096, 12288, 32, 8, "Qwen3-VL-8B", 36, 128),
        5120: LLMSize(5120, 25600, 64, 8, "Qwen3-VL-32B", 64, 128),
    },
    "internvl": {  # InternVL3: Qwen2.5 LLMs; InternVL3.5-8B: Qwen3-8B
        1536: LLMSize(1536, 8960, 12, 2, "InternVL3-2B", 28),
        3584: LLMSize(3584, 18944, 28, 4, "InternVL3-8B", 28),
        4096: LLMSize(4096, 12288, 32, 8, "InternVL3.5-8B", 36, 128, "qwen3"),
        5120: LLMSize(5120, 13824, 40, 8, "InternVL3-14B", 48),
    },
    "gemma3": {  # Gemma 3: head size 256 (27B: 128)
        2560: LLMSize(2560, 10240, 8, 4, "Gemma-3-4B", 34, 256),
        3840: LLMSize(3840, 15360, 16, 8, "Gemma-3-12B", 48, 256),
        5376: LLMSize(5376, 21504, 32, 16, "Gemma-3-27B", 62, 128),
    },
}
DEFAULT_WIDTH = {"llava": 4096, "llava_next": 4096, "onevision": 3584, "qwen2_5_vl": 3584, "qwen3_vl": 4096,
                 "internvl": 3584, "gemma3": 2560}  # fmt: skip
# The families this benchmark builds (`--family all`); the other `FAMILIES` (Qwen3.5, the MoE
# variants) are refused by name until their builders exist.
BENCHED = tuple(DEFAULT_WIDTH)


def _unbenched(family: str) -> ValueError:
    why = " (otprune.hf prunes it, but this benchmark does not build it yet)" if family in FAMILIES else ""
    return ValueError(f"--family={family!r}: must be one of all, {', '.join(BENCHED)}{why}")


@dataclasses.dataclass(frozen=True)
class Media:
    """What the prompt holds: one image of width x height, or one video of `frames` such frames."""

    kind: str  # "image" or "video"
    width: int
    height: int
    frames: int = 1

    def label(self) -> str:
        return f"image {self.width}x{self.height}" if self.kind == "image" else f"video {self.frames}x{self.width}x{self.height}"

    def resized(self, width: int, height: int) -> Media:
        return dataclasses.replace(self, width=width, height=height)


def _image_only(width: int, height: int) -> tuple[Media, ...]:
    return (Media("image", width, height),)


def _image_and_video(side: int, frames: int = 8) -> tuple[Media, ...]:
    return (Media("image", side, side), Media("video", side, side, frames))


# Each family's benchmark inputs, and the visual tokens they give:
# LLaVA-1.5: any image -> one 336 px crop -> 24 x 24 = 576;
# LLaVA-1.6: 640 x 480 (a COCO-like photo) -> 2 x 2 grid of 336 px crops + base: 576 + 36 x (48 + 1) = 2340;
# OneVision: 384 x 384 -> base + 1 x 1 grid of 384 px crops: 729 + 27 x (27 + 1) = 1485;
# Qwen2.5-VL: 448 x 448 -> 32 x 32 patches of 14 px, 2 x 2 merged -> 256; an 8-frame video of
#   448 px frames: temporal patch 2 -> 4 x 256 = 1024;
# Qwen3-VL: 16 px patches, 2 x 2 merged (32 px per token): 448 x 448 -> 14 x 14 = 196; the 8-frame
#   video -> 4 x 196 = 784 (plus a "<t seconds>" text timestamp per temporal step);
# InternVL: 1344 x 896 (3:2) -> 3 x 2 = 6 tiles of 448 px + the thumbnail (added whenever there is
#   more than one tile) = 7 tiles x 256 (32 x 32 patches of 14 px, pixel shuffle 0.5) = 1792;
# Gemma 3: any image -> 896 px, 64 x 64 patches of 14 px, pooled 4 x 4 -> 256.
DEFAULT_MEDIA: dict[str, tuple[Media, ...]] = {
    "llava": _image_only(640, 480),
    "llava_next": _image_only(640, 480),
    "onevision": _image_only(384, 384),
    "qwen2_5_vl": _image_and_video(448),
    "qwen3_vl": _image_and_video(448),
    "internvl": _image_only(1344, 896),
    "gemma3": _image_only(896, 896),
}
QUESTION = "Describe the image briefly."
INIT_STD = 0.02

# The small vision towers: real patch grids, tiny widths.
_TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
_CLIP_IMAGE, _SIGLIP_IMAGE, _PATCH = 336, 384, 14
_LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]


def _default_heads(family: str, width: int) -> tuple[int, int]:
    """(heads, kv heads) for a width without a known model: head size 128 when it gives at least
    8 heads, else the largest of 64, 32, 16, 8 that gives at least 2 heads, else the fewest heads
    (>= 2) with an even head size; grouped KV heads (about a quarter) for the Qwen LLMs."""
    heads = next(
        (width // hd for hd in (128, 64, 32, 16, 8) if width % hd == 0 and width // hd >= (8 if hd == 128 else 2)),
        next((h for h in range(2, width // 2 + 1) if width % h == 0 and (width // h) % 2 == 0), 1),
    )
    kv = heads
    if family in _QWEN_LLM:
        kv = max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)
    return heads, kv


def llm_size(
    family: str, width: int | None = None, intermediate: int | None = None, heads: int | None = None, kv_heads: int | None = None
) -> LLMSize:
    """The LLM sizes of `family` at `width` (default: the family's 7B model).

    A width of a known model (`KNOWN_SIZES`) takes its FFN size and heads; another width gets
    the family's m / d ratio (rounded to a multiple of 8) and `_default_heads`. The explicit
    arguments override. Errors name the command-line flag.
    """
    if family not in BENCHED:
        raise _unbenched(family)
    width = DEFAULT_WIDTH[family] if width is None else width
    for flag, value in (("--width", width), ("--intermediate", intermediate), ("--heads", heads), ("--kv-heads", kv_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag}={value!r}: must be an integer >= 1")
    known = KNOWN_SIZES[family].get(width)
    if known is not None:
        size = known
    else:
        base = KNOWN_SIZES[family][DEFAULT_WIDTH[family]]
        m = max(8, int(round(width * base.intermediate / base.hidden / 8)) * 8)
        size = LLMSize(width, m, *_default_heads(family, width))
    overrides = {k: v for k, v in (("intermediate", intermediate), ("heads", heads), ("kv_heads", kv_heads)) if v is not None}
    if heads is not None and kv_heads is None and size.kv_heads == size.heads:
        overrides["kv_heads"] = heads  # full multi-head attention stays so
    if overrides:
        changed = dataclasses.replace(size, **overrides)
        if changed != size:
            size = dataclasses.replace(changed, name="", real_layers=0)
            if heads is not None:  # a head count of one's own: the head size is width / heads
                size = dataclasses.replace(size, head_size=0)
    if size.hidden % size.heads and not size.head_size:
        raise ValueError(f"--heads={size.heads}: must divide --width={size.hidden}")
    if size.head_dim % 2 or size.head_dim < 4:
        raise ValueError(f"--heads={size.heads}: head size --width/--heads = {size.head_dim} must be even and >= 4 (rotary)")
    if size.heads % size.kv_heads:
        raise ValueError(f"--kv-heads={size.kv_heads}: must divide the {size.heads} attention heads (--heads)")
    return size


def decoder_params(size: LLMSize, layers: int) -> int:
    """Parameters of `layers` decoder layers (projections, MLP, norms)."""
    d, m = size.hidden, size.intermediate
    q, kv = size.heads * size.head_dim, size.kv_heads * size.head_dim
    return layers * (2 * d * q + 2 * d * kv + 3 * d * m + 2 * d)


# -------------------------------------------------------------------- building the models
@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """transformers' `no_init_weights` (parameters allocated, not filled) when it has one."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers keep it in modeling_utils
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


@torch.no_grad()
def random_weights(model: nn.Module, seed: int = 0, std: float = INIT_STD) -> None:
    """Fill every parameter in place: norm weights 1 (their biases 0); other biases 0; every other
    tensor uniform in [-a, a] with a = std * sqrt(3) (standard deviation `std`)."""
    generator = torch.Generator().manual_seed(seed)
    bound = std * math.sqrt(3.0)
    norms = {id(p) for module in model.modules() if "norm" in type(module).__name__.lower() for p in module.parameters(recurse=False)}
    for name, param in model.named_parameters():
        if id(param) in norms:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.uniform_(-bound, bound, generator=generator)


def random_model(family: str, config) -> nn.Module:
    """transformers' model of `family` for `config`, random weights (`random_weights`), fp32, eval."""
    cls = FAMILIES[family].load_model_class()
    with _no_init():
        model = cls(config)
    random_weights(model)
    return model.float().eval()


def _vocab_size(tokenizer) -> int:
    return (len(tokenizer) + 7) // 8 * 8


def _text_config(family: str, size: LLMSize, layers: int, tokenizer) -> dict:
    """The LLM config (a dict) of the Llama, Qwen2 / Qwen3 or Gemma 3 decoder at `size` with `layers` layers."""
    qwen = family in _QWEN_LLM
    config = {
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "vocab_size": _vocab_size(tokenizer),
        "max_position_embeddings": 32768 if qwen else 4096,
        "rms_norm_eps": 1e-6 if qwen else 1e-5,
        "initializer_range": INIT_STD,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "head_dim": size.head_dim,  # always written: Qwen3's and Gemma 3's configs default to 128 / 256
    }
    return config


def _image(width: int, height: int, seed: int = 0):
    """A random RGB image (H, W, 3) uint8."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()


def _video(media: Media, seed: int = 0):
    """`media.frames` random RGB frames (T, H, W, 3) uint8."""
    generator = torch.Generator().manual_seed(seed)
    shape = (media.frames, media.height, media.width, 3)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).numpy()


@dataclasses.dataclass
class Parts:
    """What `build` needs of a family: its config, its processor, and the prompt for an image /
    a video (None: the family takes no video here)."""

    config: object
    processor: object
    image_prompt: str
    video_prompt: str | None = None


def _llava_parts(family: str, size: LLMSize, layers: int, videos: bool = True) -> Parts:
    import transformers
    from transformers import CLIPVisionConfig

    from otprune.hf.tiny import VICUNA_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(_LLAMA_SPECIALS, bos=True)
    crop = {"height": _CLIP_IMAGE, "width": _CLIP_IMAGE}
    common = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": (_CLIP_IMAGE // _PATCH) ** 2,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
    }
    tower = CLIPVisionConfig(**_TOWER, image_size=_CLIP_IMAGE, patch_size=_PATCH, projection_dim=64)
    text = transformers.LlamaConfig(**_text_config(family, size, layers, tokenizer))
    processor_args = {
        "tokenizer": tokenizer,
        "patch_size": _PATCH,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": VICUNA_TEMPLATE,
    }
    if family == "llava":
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": _CLIP_IMAGE}, crop_size=crop)
        processor = transformers.LlavaProcessor(image_processor=image_processor, **processor_args)
        config = transformers.LlavaConfig(vision_config=tower, text_config=text, **common)
    else:
        image_processor = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": _CLIP_IMAGE}, crop_size=crop, image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS
        )
        processor = transformers.LlavaNextProcessor(image_processor=image_processor, **processor_args)
        config = transformers.LlavaNextConfig(
            vision_config=tower, text_config=text, image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS, **common
        )
    return Parts(config, processor, f"USER: <image>\n{QUESTION} ASSISTANT:")


def _onevision_parts(family: str, size: LLMSize, layers: int, videos: bool = True) -> Parts:
    import transformers

    from otprune.hf.tiny import QWEN_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(_QWEN_SPECIALS, bos=False)
    square = {"height": _SIGLIP_IMAGE, "width": _SIGLIP_IMAGE}
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=_ONEVISION_PINPOINTS),
        tokenizer=tokenizer,
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=square),
        num_image_tokens=(_SIGLIP_IMAGE // _PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=QWEN_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(
            **_TOWER, image_size=_SIGLIP_IMAGE, patch_size=_PATCH, vision_use_head=False
        ),
        text_config=transformers.Qwen2Config(**_text_config(family, size, layers, tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    return Parts(config, processor, f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def _mrope_section(head_dim: int, temporal_share: float) -> list[int]:
    """(temporal, height, width) rotary frequencies of a head of `head_dim`: `temporal_share` of the
    head_dim / 2 frequencies (rounded down) for time, the rest split evenly (width takes the odd one).
    Qwen2.5-VL (1/4): [16, 24, 24] at 128; Qwen3-VL (3/8): [24, 20, 20] at 128."""
    half = head_dim // 2
    temporal = int(half * temporal_share)
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _qwen_prompt(placeholder: str) -> str:
    return f"<|im_start|>user\n<|vision_start|>{placeholder}<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def _qwen_parts(family: str, size: LLMSize, layers: int, videos: bool = True) -> Parts:
    """Qwen2.5-VL (14 px patches, window attention tower, Qwen2 LLM) or Qwen3-VL (16 px patches,
    learned position embeddings, DeepStack after 3 tower blocks, Qwen3 LLM with interleaved M-RoPE).
    `videos=False`: the Qwen2-VL video processor for both (vLLM's venv has no torchvision for Qwen3-VL's)."""
    import transformers

    from otprune.hf import qwen2_5_vl_tiny as tiny

    qwen3 = family == "qwen3_vl"
    patch, merge, temporal = (16 if qwen3 else 14), 2, 2
    common = {"patch_size": patch, "temporal_patch_size": temporal, "merge_size": merge}
    if qwen3:  # Qwen3-VL's preprocessor defaults
        image_processor = transformers.Qwen2VLImageProcessor(min_pixels=65536, max_pixels=16777216, **common)
        frames = {"size": {"shortest_edge": 4096, "longest_edge": 25165824}, **common}
    else:  # Qwen2.5-VL's
        image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, **common)
        frames = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, **common}
    if qwen3 and videos:
        video_processor = transformers.Qwen3VLVideoProcessor(**frames)
    else:
        video_processor = transformers.Qwen2VLVideoProcessor(**frames)
    processor_cls = transformers.Qwen3VLProcessor if qwen3 else transformers.Qwen2_5_VLProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tiny.build_tokenizer(),
                              video_processor=video_processor, chat_template=tiny.CHAT_TEMPLATE)  # fmt: skip
    ids = tiny.SPECIAL_IDS
    text = {
        **_text_config(family, size, layers, processor.tokenizer),
        "vocab_size": tiny.VOCAB_SIZE,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0 if qwen3 else 1000000.0,
            "mrope_section": _mrope_section(size.head_dim, 3 / 8 if qwen3 else 1 / 4),
            **({"mrope_interleaved": True} if qwen3 else {}),
        },
    }
    vision = {
        "depth": 3 if qwen3 else _TOWER["num_hidden_layers"],
        "hidden_size": _TOWER["hidden_size"],
        "intermediate_size": _TOWER["intermediate_size"],
        "num_heads": _TOWER["num_attention_heads"],
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": temporal,
        "out_hidden_size": size.hidden,
    }
    if qwen3:  # the real 48 x 48 position grid; one DeepStack merger per block (the real model: 3)
        vision.update(num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2])
    else:
        vision.update(window_size=112, fullatt_block_indexes=[_TOWER["num_hidden_layers"] - 1])
    config_cls = transformers.Qwen3VLConfig if qwen3 else transformers.Qwen2_5_VLConfig
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Parts(config, processor, _qwen_prompt("<|image_pad|>"), _qwen_prompt("<|video_pad|>"))


def _internvl_parts(family: str, size: LLMSize, layers: int, videos: bool = True) -> Parts:
    """InternVL3 / 3.5 (HF format): 448 px tiles (up to 12 + a thumbnail), InternViT-like tower with
    14 px patches, pixel shuffle 0.5 (256 tokens per tile), a Qwen2.5 (InternVL3) or Qwen3 (InternVL3.5) LLM."""
    import transformers

    from otprune.hf import internvl_tiny as tiny
    from otprune.hf.tiny import build_tokenizer

    tile = 448
    tokenizer = build_tokenizer(tiny.SPECIALS, bos=False, named=tiny.NAMED)
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=12
    )
    processor = transformers.InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=transformers.InternVLVideoProcessor(),  # required even for images (serve venv: the fixup's stand-in)
        image_seq_length=(tile // _PATCH // 2) ** 2, chat_template=tiny.CHAT_TEMPLATE,
    )  # fmt: skip
    vision = transformers.InternVLVisionConfig(
        **_TOWER, image_size=[tile, tile], patch_size=[_PATCH, _PATCH], initializer_range=INIT_STD
    )
    text = {**_text_config(family, size, layers, tokenizer), "model_type": size.text_type or "qwen2"}
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    return Parts(config, processor, f"<|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def _gemma3_parts(family: str, size: LLMSize, layers: int, videos: bool = True) -> Parts:
    """Gemma 3: a SigLIP-like tower on 896 px images (14 px patches, 64 x 64, average-pooled 4 x 4 to
    256 tokens), Gemma 3's LLM (sliding-window layers 5 of every 6, window 1024; the image tokens
    attend to each other both ways)."""
    import transformers

    from otprune.hf import gemma3_tiny as tiny
    from otprune.hf.tiny import build_tokenizer

    side, tokens = 896, 256
    tokenizer = build_tokenizer(tiny.SPECIALS, bos=False, named=tiny.NAMED)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens, chat_template=tiny.CHAT_TEMPLATE
    )
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    text = transformers.Gemma3TextConfig(
        **_text_config(family, size, layers, tokenizer), query_pre_attn_scalar=size.head_dim, sliding_window=1024,
        layer_types=[pattern[i % 6] for i in range(layers)],
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(**_TOWER, image_size=side, patch_size=_PATCH, vision_use_head=False)
    ids = {name: tokenizer.convert_tokens_to_ids(tiny.NAMED[key]) for name, key in
           (("boi_token_index", "boi_token"), ("eoi_token_index", "eoi_token"), ("image_token_index", "image_token"))}  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=tokens, tie_word_embeddings=False, **ids
    )
    return Parts(config, processor, f"<bos><start_of_turn>user\n<start_of_image>{QUESTION}<end_of_turn>\n<start_of_turn>model\n")


# family -> (family, size, layers, videos) -> Parts. A new family is one more entry (and its DEFAULT_MEDIA).
# `videos=False`: no processor that needs torchvision (vLLM's venv; images only).
PARTS: dict[str, Callable[..., Parts]] = {
    "llava": _llava_parts,
    "llava_next": _llava_parts,
    "onevision": _onevision_parts,
    "qwen2_5_vl": _qwen_parts,
    "qwen3_vl": _qwen_parts,
    "internvl": _internvl_parts,
    "gemma3": _gemma3_parts,
}


def parts(family: str, size: LLMSize, layers: int, videos: bool = True) -> Parts:
    """`family`'s config (at `size`, `layers` decoder layers, a tiny tower with the real patch grid),
    processor and prompts (`videos=False`: a processor for images only, no torchvision needed)."""
    if family not in PARTS:
        raise _unbenched(family)
    return PARTS[family](family, size, layers, videos=videos)


def processor_inputs(family: str, part: Parts, media: Media) -> dict:
    """The processor's inputs (a dict of tensors) for the family's prompt with one random image or video."""
    if media.kind == "image":
        return dict(part.processor(images=[_image(media.width, media.height)], text=[part.image_prompt], return_tensors="pt"))
    if media.kind != "video" or part.video_prompt is None:
        videos = [m.label() for m in DEFAULT_MEDIA[family] if m.kind == "video"]
        raise ValueError(f"media={media.label()!r}: family {family!r} takes {'videos' if videos else 'images only'} here")
    extra = {"do_sample_frames": False}
    if family == "qwen3_vl":  # its prompt has a "<t seconds>" timestamp per temporal patch: say 2 frames a second
        extra["video_metadata"] = [{"fps": 2.0, "total_num_frames": media.frames, "frames_indices": list(range(media.frames))}]
    return dict(part.processor(videos=[_video(media)], text=[part.video_prompt], return_tensors="pt", **extra))


def build(family: str, size: LLMSize, layers: int, media: Media | None = None):
    """(model, inputs): `family`'s model at `size` with `layers` decoder layers and random
    weights, fp32 on CPU, and the processor's inputs for one prompt with one random image
    (or video: `media`; default the family's first `DEFAULT_MEDIA`)."""
    part = parts(family, size, layers)
    inputs = processor_inputs(family, part, media or DEFAULT_MEDIA[family][0])
    return random_model(family, part.config), inputs


# -------------------------------------------------------------------- timing
class LLMTimer:
    """Wall time spent inside a module's forward (the language model), via forward hooks."""

    def __init__(self, module: nn.Module) -> None:
        self.ms = 0.0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave),
        ]

    def _enter(self, module, args) -> None:
        self._start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        self.ms += (time.perf_counter() - self._start) * 1e3

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> LLMTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclasses.dataclass
class Run:
    """One timed prefill: total and LLM-only wall time (ms), and the pruned run's stats."""

    total_ms: float
    llm_ms: float
    stats: dict | None = None


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model.language_model`) of a supported model."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        raise ValueError(f"model: {type(model).__name__} has no model.language_model to time")
    return lm


@contextlib.contextmanager
def _quiet_adapters() -> Iterator[None]:
    """Silence the "otprune" logger's INFO line that every newly applied adapter writes."""
    logger = logging.getLogger("otprune")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def prefill_once(model: nn.Module, inputs: dict, config: PruneConfig | None, timer: LLMTimer) -> Run:
    """One forward over the prompt (the last position's logits, a fresh cache); pruned when `config`."""
    from otprune import hf

    adapter = hf.apply(model, config) if config is not None else None
    try:
        timer.ms = 0.0
        with torch.inference_mode():
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1, use_cache=True)
            total = (time.perf_counter() - start) * 1e3
        stats = None
        if adapter is not None:
            if len(adapter.last_stats) != 1:
                raise RuntimeError(f"{type(model).__name__}: the pruned prefill left {len(adapter.last_stats)} stats, expected 1")
            stats = dict(adapter.last_stats[0])
        return Run(total, timer.ms, stats)
    finally:
        if adapter is not None:
            adapter.remove()


def predicted_ratio(tokens_before: int, tokens_after: int, layers: int, hidden: int, intermediate: int) -> float:
    """FLOPs of `layers` decoder layers on the pruned sequence / on the unpruned one (`otprune.flops`)."""
    full = flops.schedule_flops([tokens_before] * layers, hidden, intermediate)
    pruned = flops.schedule_flops([tokens_after] * layers, hidden, intermediate)
    return pruned / full


def _paired_runs(family, model, inputs, config, repeats, media, say) -> tuple[list[Run], list[Run]]:
    """A warm-up pair, then `repeats` pairs (unpruned, pruned): the timed runs of each."""
    with _quiet_adapters(), LLMTimer(language_model(model)) as timer:
        prefill_once(model, inputs, None, timer)
        stats = prefill_once(model, inputs, config, timer).stats
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        if stats["seq_len_before"] != real:
            raise RuntimeError(f"[{family}] the adapter counted {stats['seq_len_before']} prompt tokens, the prompt has {real}")
        say(f"[{family}] {media.label()} -> {stats['visual_tokens_before']} visual tokens "
            f"(kept {stats['visual_tokens_after']}), {stats['text_tokens']} text tokens")  # fmt: skip
        unpruned, pruned = [], []
        for index in range(repeats):
            unpruned.append(prefill_once(model, inputs, None, timer))
            pruned.append(prefill_once(model, inputs, config, timer))
            say(f"[{family}] run {index + 1}/{repeats}: unpruned {unpruned[-1].total_ms:.0f} ms, "
                f"pruned {pruned[-1].total_ms:.0f} ms")  # fmt: skip
    return unpruned, pruned


@dataclasses.dataclass
class Row:
    """One family's result. Times are medians (ms); ratios are pruned / unpruned."""

    family: str
    size: LLMSize
    layers: int
    media: Media
    visual_before: int
    visual_after: int
    text_tokens: int
    unpruned_ms: float
    pruned_ms: float
    select_ms: float
    llm_unpruned_ms: float
    llm_pruned_ms: float
    measured: float  # median of the paired total-time ratios
    llm_measured: float  # median of the paired LLM-time ratios
    predicted: float  # FLOPs formula on the same token counts, d, m and layers


def bench_family(
    family: str,
    size: LLMSize,
    layers: int,
    config: PruneConfig,
    repeats: int = 3,
    media: Media | None = None,
    progress: Callable[[str], None] | None = None,
) -> Row:
    """Build `family`'s model, run a warm-up, then `repeats` pairs (unpruned, pruned); one Row."""
    say = progress or (lambda message: None)
    media = media or DEFAULT_MEDIA[family][0]
    gb = decoder_params(size, layers) * 4 / 1e9
    what = f"{size.name} sizes" if size.name else "custom sizes"
    of = f" of the real {size.real_layers}" if size.real_layers else ""
    say(f"[{family}] building {FAMILIES[family].model_class} ({what}: {size.label()}), {layers}{of} decoder layer(s) "
        f"(~{gb:.1f} GB fp32), random weights")  # fmt: skip
    start = time.perf_counter()
    model, inputs = build(family, size, layers, media)
    try:
        say(f"[{family}] built in {time.perf_counter() - start:.1f} s; warm-up (one unpruned, one pruned prefill)")
        unpruned, pruned = _paired_runs(family, model, inputs, config, repeats, media, say)
    finally:
        del model, inputs
        gc.collect()
    last = pruned[-1].stats
    before = last["seq_len_before"]
    after = last["seq_len_after"]
    return Row(
        family=family,
        size=size,
        layers=layers,
        media=media,
        visual_before=last["visual_tokens_before"],
        visual_after=last["visual_tokens_after"],
        text_tokens=last["text_tokens"],
        unpruned_ms=statistics.median(r.total_ms for r in unpruned),
        pruned_ms=statistics.median(r.total_ms for r in pruned),
        select_ms=statistics.median(r.stats["select_ms"] for r in pruned),
        llm_unpruned_ms=statistics.median(r.llm_ms for r in unpruned),
        llm_pruned_ms=statistics.median(r.llm_ms for r in pruned),
        measured=statistics.median(p.total_ms / u.total_ms for u, p in zip(unpruned, pruned, strict=True)),
        llm_measured=statistics.median(p.llm_ms / u.llm_ms for u, p in zip(unpruned, pruned, strict=True)),
        predicted=predicted_ratio(before, after, layers, size.hidden, size.intermediate),
    )


def run(
    families=BENCHED,
    sizes: dict[str, LLMSize] | None = None,
    layers: int = 4,
    method: str = "otprune",
    ratio: float = 0.098,
    repeats: int = 3,
    media: dict[str, tuple[Media, ...]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """One Row per family and input (`media`, default `DEFAULT_MEDIA`: e.g. Qwen's image, then its
    video); each model is freed before the next is built."""
    config = PruneConfig(method=method, layer=0, ratio=ratio)
    sizes = sizes or {}
    media = media or {}
    rows = []
    for family in families:
        size = sizes.get(family) or llm_size(family)
        for item in media.get(family) or DEFAULT_MEDIA[family]:
            rows.append(bench_family(family, size, layers, config, repeats, item, progress))
    return rows


def format_table(rows: list[Row], method: str, ratio: float, repeats: int) -> str:
    """The markdown table, with a header saying what was measured."""
    head = [
        "family", "input", "LLM sizes", "layers", "visual tokens", "text tokens", "prefill ms unpruned", "prefill ms pruned",
        "of which selection ms", "LLM ms unpruned -> pruned", "measured pruned/unpruned", "LLM-only pruned/unpruned",
        "FLOPs-predicted pruned/unpruned",
    ]  # fmt: skip
    lines = [
        f"Prefill benchmark: one prompt with one image or video; {method}, ratio {ratio}, before the LLM (layer 0); fp32 on CPU, "
        f"torch threads={torch.get_num_threads()}; medians of {repeats} paired runs after a warm-up.",
        "Random weights at the real LLM sizes but only `layers` decoder layers; a tiny vision tower giving the real "
        "visual-token count. measured = the whole forward (vision tower, projector, selection, LLM); LLM-only = inside "
        "the language model; FLOPs-predicted = sum over layers of 4nd^2 + 2n^2d + 2ndm (otprune.flops) for the same "
        "token counts n, d, m.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        name = f" ({r.size.name})" if r.size.name else ""
        cells = [
            f"{r.family}{name}",
            r.media.label(),
            r.size.label(),
            str(r.layers),
            f"{r.visual_before} -> {r.visual_after}",
            str(r.text_tokens),
            f"{r.unpruned_ms:.0f}",
            f"{r.pruned_ms:.0f}",
            f"{r.select_ms:.1f}",
            f"{r.llm_unpruned_ms:.0f} -> {r.llm_pruned_ms:.0f}",
            f"{r.measured:.3f}",
            f"{r.llm_measured:.3f}",
            f"{r.predicted:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
