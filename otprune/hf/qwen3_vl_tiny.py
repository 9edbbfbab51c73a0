"""Tiny random-weight Qwen3-VL and Qwen3.5 checkpoints in the Hugging Face format, for tests.

    from otprune.hf.qwen3_vl_tiny import write_tiny_qwen3_vl, write_tiny_qwen3_5
    folder = write_tiny_qwen3_vl("/tmp/tiny-qwen3_vl")
    processor = AutoProcessor.from_pretrained(folder)                       # offline
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder)

Same layout as `otprune.hf.qwen2_5_vl_tiny` (its byte-level tokenizer, Qwen's special tokens and
chat template, seeded large random weights), at Qwen3-VL's geometry: 16 px patches, 2 x 2
spatial merge (32 px per merged visual token side; an image gives 4 to 36 visual tokens, a
128 x 192 image 4 x 6 = 24), a 2-block vision tower of width 32 with learned position
embeddings (8 x 8 grid, interpolated) and DeepStack mergers after both blocks, an LLM of
2 decoder layers of width 64 (interleaved M-RoPE). Qwen3.5: the same vision tower without
DeepStack and a 2-layer hybrid LLM (one Gated DeltaNet layer, one attention layer). The MoE
variants (`write_tiny_qwen3_vl_moe`, `write_tiny_qwen3_5_moe`) have 4 experts of width 32 per layer.
"""

from __future__ import annotations

from pathlib import Path

from otprune.hf.qwen2_5_vl_tiny import CHAT_TEMPLATE, SPECIAL_IDS, VOCAB_SIZE, build_tokenizer, save_tiny

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 32 px per merged visual token side
MIN_PIXELS = FACTOR * FACTOR * 4
MAX_PIXELS = FACTOR * FACTOR * 36

TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
}
VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "out_hidden_size": TEXT["hidden_size"],
    "num_position_embeddings": 64,
}
# Qwen3.5's hybrid LLM: Gated DeltaNet (linear attention) then full attention.
LINEAR = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "full_attention_interval": 2,
}


# The MoE LLMs: 4 experts of width 32, 2 per token (Qwen3.5's also a shared expert).
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}


def build_processor():
    """Qwen3-VL's processor (Qwen3.5 uses the same) around the tiny tokenizer."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    common = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE}
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **common)
    video_processor = Qwen3VLVideoProcessor(size=size, **common)
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )


def _text_config() -> dict:
    return {
        **TEXT,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
        "eos_token_id": SPECIAL_IDS["<|im_end|>"],
        "pad_token_id": SPECIAL_IDS["<|endoftext|>"],
        "initializer_range": 0.02,
    }


def _token_ids() -> dict:
    return {
        "image_token_id": SPECIAL_IDS["<|image_pad|>"],
        "video_token_id": SPECIAL_IDS["<|video_pad|>"],
        "vision_start_token_id": SPECIAL_IDS["<|vision_start|>"],
        "vision_end_token_id": SPECIAL_IDS["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def build_config():
    """The tiny `Qwen3VLConfig` (DeepStack after both vision blocks, added after LLM layers 0 and 1)."""
    from transformers import Qwen3VLConfig

    vision = {**VISION, "deepstack_visual_indexes": [0, 1]}
    return Qwen3VLConfig(text_config=_text_config(), vision_config=vision, **_token_ids())


def build_config_qwen3_5():
    """The tiny `Qwen3_5Config`."""
    from transformers import Qwen3_5Config

    text = {**_text_config(), **LINEAR}
    return Qwen3_5Config(text_config=text, vision_config=dict(VISION), **_token_ids())


def build_config_qwen3_vl_moe():
    """The tiny `Qwen3VLMoeConfig` (as `build_config`, with an MoE LLM)."""
    from transformers import Qwen3VLMoeConfig

    vision = {**VISION, "deepstack_visual_indexes": [0, 1]}
    return Qwen3VLMoeConfig(text_config={**_text_config(), **MOE}, vision_config=vision, **_token_ids())


def build_config_qwen3_5_moe():
    """The tiny `Qwen3_5MoeConfig` (as `build_config_qwen3_5`, with an MoE LLM and a shared expert)."""
    from transformers import Qwen3_5MoeConfig

    text = {**_text_config(), **LINEAR, **MOE, "shared_expert_intermediate_size": 32}
    text.pop("decoder_sparse_step")
    return Qwen3_5MoeConfig(text_config=text, vision_config=dict(VISION), **_token_ids())


def _write(path: str | Path, config, model_class: str, seed: int) -> Path:
    import transformers

    return save_tiny(path, getattr(transformers, model_class)(config), build_processor(), seed)


def write_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen3-VL checkpoint (model, processor, tokenizer, chat template) to `path`; return it."""
    return _write(path, build_config(), "Qwen3VLForConditionalGeneration", seed)


def write_tiny_qwen3_5(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen3.5 checkpoint (model, processor, tokenizer, chat template) to `path`; return it."""
    return _write(path, build_config_qwen3_5(), "Qwen3_5ForConditionalGeneration", seed)


def write_tiny_qwen3_vl_moe(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen3-VL MoE checkpoint to `path`; return it."""
    return _write(path, build_config_qwen3_vl_moe(), "Qwen3VLMoeForConditionalGeneration", seed)


def write_tiny_qwen3_5_moe(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen3.5 MoE checkpoint to `path`; return it."""
    return _write(path, build_config_qwen3_5_moe(), "Qwen3_5MoeForConditionalGeneration", seed)
