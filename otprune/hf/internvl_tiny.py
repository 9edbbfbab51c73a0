"""A tiny random-weight InternVL (3 / 3.5, HF format) checkpoint, for tests and smoke runs.

    from otprune.hf.internvl_tiny import write_tiny_internvl
    folder = write_tiny_internvl("/tmp/tiny-internvl")
    processor = AutoProcessor.from_pretrained(folder)                        # offline
    model = InternVLForConditionalGeneration.from_pretrained(folder)

InternVL's layout at toy scale: 64 px tiles (dynamic resolution: 1 to 4 crops, plus a thumbnail
when there are several), a 2-layer InternViT of width 32 with 8 px patches (8 x 8 patches, CLS
dropped, pixel shuffle 0.5: 16 tokens per tile), a Qwen2 LLM of 2 layers of width 64, Qwen's chat
format (an image part is `<IMG_CONTEXT>`, expanded by the processor to `<img>` + 16 x tiles x
`<IMG_CONTEXT>` + `</img>`; a video part `<video>`, expanded to one `Frame{i}: <img>...</img>`
line per frame), a byte-level tokenizer built here. Seeded weights, init range 0.1.
"""

from __future__ import annotations

from pathlib import Path

from otprune.hf.tiny import INIT_RANGE, TOWER, _text_config, _vocab_size, build_tokenizer, save_random_model

TILE = 64
PATCH_SIZE = 8
TOKENS_PER_TILE = 16  # (64 / 8)^2 = 64 patches, pixel shuffle 0.5
MAX_TILES = 4
SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_processor():
    """InternVL's processor around the tiny tokenizer: 64 px tiles, up to 4 crops, 16 tokens per tile."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tokenizer = build_tokenizer(SPECIALS, bos=False, named=NAMED)
    size = {"height": TILE, "width": TILE}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES)
    video_processor = InternVLVideoProcessor(size=size)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATE)  # fmt: skip


def write_tiny_internvl(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny InternVL checkpoint (model, processor, tokenizer, chat template) to `path`; return it."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    processor = build_processor()
    tokenizer = processor.tokenizer
    vision = InternVLVisionConfig(
        hidden_size=TOWER["hidden_size"], intermediate_size=TOWER["intermediate_size"], num_hidden_layers=TOWER["num_hidden_layers"],
        num_attention_heads=TOWER["num_attention_heads"], image_size=[TILE, TILE], patch_size=[PATCH_SIZE, PATCH_SIZE],
        initializer_range=INIT_RANGE,
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=vision, text_config=_text_config("qwen2", _vocab_size(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    return save_random_model(InternVLForConditionalGeneration, config, processor, path, seed)
