"""Tiny random-weight LLaVA / LLaVA-NeXT checkpoints that vLLM (CPU backend) loads, built offline.

    from otprune.serve.tiny import write_tiny_llava
    path = write_tiny_llava("/tmp/tiny-vllm-llava")       # then LLM(model=str(path), ...)

Differences from `otprune.hf.tiny` (which vLLM refuses):
- attention head size 32 in the LLM and the vision tower (vLLM's CPU attention supports head
  sizes 32, 64, 80, ...; the hf tiny models use 16);
- the vision tower's weights under `vision_tower.vision_model.*`, the key layout of the hub
  checkpoints that vLLM's loader expects (transformers 5.x `save_pretrained` writes
  `vision_tower.embeddings.*`); transformers loads both layouts;
- a real CLIP structure at a small crop (`image_size`, default 112 px, 14 px patches: 64 tokens
  per crop) instead of 336 px (576 tokens), so tests stay fast; `image_size=336` gives LLaVA-1.5's
  geometry (576 tokens per image) for benchmarks, `hidden_size` / `layers` the LLM width/depth.

Same tokenizer and chat template as `otprune.hf.tiny` (byte-level, Vicuna "USER: ... ASSISTANT:").
Imports only torch, transformers and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

PATCH_SIZE = 14
INIT_RANGE = 0.1  # larger than usual, so that pruning visibly changes the logits
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def _tokenizer():
    from otprune.hf.tiny import build_tokenizer

    return build_tokenizer(SPECIALS, bos=True)


def _configs(config_cls, tokenizer, image_size: int, hidden_size: int, layers: int, heads: int,
             intermediate_size: int | None = None, **extra):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,  # head size 32
        image_size=image_size, patch_size=PATCH_SIZE, projection_dim=64, initializer_range=INIT_RANGE,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        vocab_size=(len(tokenizer) + 7) // 8 * 8, max_position_embeddings=4096, initializer_range=INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    if hidden_size // heads < 32:
        raise ValueError(f"hidden_size={hidden_size}, heads={heads}: head size {hidden_size // heads} < 32 (vLLM CPU)")
    from otprune.hf.tiny import llava_config

    return llava_config(config_cls, vision, text, tokenizer, image_size, **extra)


def _rewrite_vision_keys(folder: Path) -> None:
    """`...vision_tower.X` -> `...vision_tower.vision_model.X` in every safetensors file."""
    from safetensors.torch import load_file, save_file

    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(file))
        renamed = {}
        for key, value in tensors.items():
            head, sep, rest = key.partition("vision_tower.")
            if sep and not rest.startswith("vision_model."):
                key = f"{head}vision_tower.vision_model.{rest}"
            renamed[key] = value.contiguous()
        save_file(renamed, str(file), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            (k.replace("vision_tower.", "vision_tower.vision_model.", 1) if "vision_tower.vision_model." not in k
             and "vision_tower." in k else k): v
            for k, v in data["weight_map"].items()
        }  # fmt: skip
        index.write_text(json.dumps(data, indent=2))


def _save(model_cls, config, processor, path: str | Path, seed: int) -> Path:
    """`otprune.hf.tiny.save_random_model`, then the vision keys in the layout vLLM loads."""
    from otprune.hf.tiny import save_random_model

    folder = save_random_model(model_cls, config, processor, path, seed)
    _rewrite_vision_keys(folder)
    return folder


def write_tiny_llava(
    path: str | Path, seed: int = 0, *, image_size: int = 112, hidden_size: int = 128, layers: int = 2, heads: int = 4,
    intermediate_size: int | None = None,
) -> Path:
    """A tiny `LlavaForConditionalGeneration` (LLaVA-1.5 layout) that vLLM loads: (image_size / 14)^2 tokens per image."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from otprune.hf.tiny import VICUNA_TEMPLATE

    tokenizer = _tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=VICUNA_TEMPLATE,
    )  # fmt: skip
    config = _configs(LlavaConfig, tokenizer, image_size, hidden_size, layers, heads, intermediate_size)
    return _save(LlavaForConditionalGeneration, config, processor, path, seed)


def write_tiny_llava_next(
    path: str | Path, seed: int = 0, *, image_size: int = 56, hidden_size: int = 128, layers: int = 2, heads: int = 4
) -> Path:
    """A tiny `LlavaNextForConditionalGeneration` (anyres grids of 2 x 1, 1 x 2 and 2 x 2 crops) that vLLM loads."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from otprune.hf.tiny import VICUNA_TEMPLATE

    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    tokenizer = _tokenizer()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )  # fmt: skip
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=VICUNA_TEMPLATE,
    )  # fmt: skip
    config = _configs(LlavaNextConfig, tokenizer, image_size, hidden_size, layers, heads, image_grid_pinpoints=pinpoints)
    return _save(LlavaNextForConditionalGeneration, config, processor, path, seed)


def _regroup_heads(folder: Path, heads: int, kv_heads: int, mrope_section: list[int] | None = None) -> None:
    """Fewer, wider LLM attention heads in config.json (the projections keep their shapes: hidden x
    hidden for queries, hidden x kv_heads * head_dim for keys and values), so vLLM's CPU attention
    (head size >= 32) takes the same weights; Qwen's M-RoPE sections re-split over the wider head."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    text = config["text_config"]
    old_head = text["hidden_size"] // text["num_attention_heads"]
    if text["num_key_value_heads"] * old_head != kv_heads * (text["hidden_size"] // heads):
        raise ValueError(f"{heads} heads / {kv_heads} kv heads change the key/value projection shapes")
    text["num_attention_heads"], text["num_key_value_heads"] = heads, kv_heads
    text.pop("head_dim", None)
    if mrope_section is not None:
        if 2 * sum(mrope_section) != text["hidden_size"] // heads:
            raise ValueError(f"mrope_section={mrope_section}: must sum to half the head size")
        for key in ("rope_parameters", "rope_scaling"):
            if isinstance(text.get(key), dict) and "mrope_section" in text[key]:
                text[key]["mrope_section"] = list(mrope_section)
    file.write_text(json.dumps(config, indent=2))


def write_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """`otprune.hf.qwen2_5_vl_tiny`'s checkpoint with its LLM regrouped to 2 heads of 32 (1 kv head) for vLLM."""
    from otprune.hf.qwen2_5_vl_tiny import write_tiny_qwen2_5_vl as write_hf

    folder = write_hf(path, seed=seed)
    _regroup_heads(folder, heads=2, kv_heads=1, mrope_section=[4, 6, 6])
    return folder


def write_tiny_onevision(path: str | Path, seed: int = 0) -> Path:
    """`otprune.hf.tiny`'s LLaVA-OneVision checkpoint with its LLM regrouped to 2 heads of 32 (1 kv head) for vLLM."""
    from otprune.hf.tiny import write_tiny_onevision as write_hf

    folder = write_hf(path, seed=seed)
    _regroup_heads(folder, heads=2, kv_heads=1)
    _rewrite_vision_keys(folder)
    return folder


def write_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny `Qwen3VLForConditionalGeneration` that vLLM loads: Qwen3 LLM of width 64 (2 heads of 32,
    1 kv head, interleaved M-RoPE sections [4, 6, 6]), a 2-block vision tower of width 32 with 16 px
    patches, 2 x 2 merge and one DeepStack layer (block 0), the tokenizer and chat template of
    `otprune.hf.qwen2_5_vl_tiny` (a 160 x 128 image gives 5 x 4 = 20 visual tokens). Its video processor
    is Qwen3-VL's (the serve venv runs it without torchvision, scripts/serve_venv_fixup.py), with a pixel
    budget of 144 tokens per frame pair over all frames."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from otprune.hf import qwen2_5_vl_tiny as qwen

    patch, merge = 16, 2
    factor = patch * merge
    sizes = {"size": {"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * 36}}
    common = {"patch_size": patch, "temporal_patch_size": 2, "merge_size": merge}
    images = Qwen2VLImageProcessor(**sizes, **common)
    # the image processor's normalization, as in Qwen3-VL's checkpoints (vLLM may normalize both on the device
    # with the image processor's mean / std)
    videos = Qwen3VLVideoProcessor(size={"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * 288},
                                   image_mean=list(images.image_mean), image_std=list(images.image_std), **common)  # fmt: skip
    processor = Qwen3VLProcessor(image_processor=images, tokenizer=qwen.build_tokenizer(), video_processor=videos,
                                 chat_template=qwen.CHAT_TEMPLATE)  # fmt: skip
    ids = qwen.SPECIAL_IDS
    text = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                            "mrope_interleaved": True},
        "vocab_size": qwen.VOCAB_SIZE, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": patch,
        "spatial_merge_size": merge, "temporal_patch_size": 2, "out_hidden_size": 64,
        "num_position_embeddings": 64, "deepstack_visual_indexes": [0],
    }  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )  # fmt: skip
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    qwen._randomize(model, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]).save_pretrained(folder)
    return folder


def write_tiny_internvl(path: str | Path, seed: int = 0) -> Path:
    """`otprune.hf.internvl_tiny`'s checkpoint (64 px tiles, 16 tokens per tile, up to 4 crops plus a
    thumbnail) with its Qwen2 LLM regrouped to 2 heads of 32 (1 kv head) for vLLM. Its keys already
    have the layout vLLM's loader reads (`vision_tower.embeddings.*`, `language_model.model.*`)."""
    from otprune.hf.internvl_tiny import write_tiny_internvl as write_hf

    folder = write_hf(path, seed=seed)
    _regroup_heads(folder, heads=2, kv_heads=1)
    return folder


def write_tiny_gemma3(path: str | Path, seed: int = 0) -> Path:
    """`otprune.hf.gemma3_tiny`'s checkpoint (64 px images, 16 tokens each, one sliding-window and one
    global layer) with an LLM of 2 heads of 32 (1 kv head; Gemma's per-head q/k norms are sized by the
    head, so the heads are built at 32, not regrouped), the SigLIP keys in the layout vLLM loads, and
    the runs of 1 to 4 newlines as tokens of their own (vLLM's Gemma 3 processor looks "\\n" .. "\\n\\n\\n\\n"
    up in the vocabulary, as Gemma's tokenizer has them; ids inside the embedding's padded rows)."""
    from otprune.hf.gemma3_tiny import write_tiny_gemma3 as write_hf

    folder = write_hf(path, seed=seed, num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32)
    gemma3_for_vllm(folder)
    return folder


def gemma3_for_vllm(folder: Path) -> None:
    """A Gemma 3 checkpoint saved by transformers with a `otprune.hf.tiny` tokenizer, made loadable by
    vLLM: the SigLIP keys under `vision_tower.vision_model.`, and the runs of 1 to 4 newlines added as
    tokens (vLLM's Gemma 3 processor looks them up; they must fit in the embedding's padded rows)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    _rewrite_vision_keys(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken("\n" * n, normalized=False) for n in (4, 3, 2, 1)])
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the embedding {vocab} rows")
    tokenizer.save_pretrained(folder)


WRITERS = {"llava": write_tiny_llava, "llava_next": write_tiny_llava_next, "qwen2_5_vl": write_tiny_qwen2_5_vl,
           "onevision": write_tiny_onevision, "qwen3_vl": write_tiny_qwen3_vl, "internvl": write_tiny_internvl,
           "gemma3": write_tiny_gemma3}  # fmt: skip
