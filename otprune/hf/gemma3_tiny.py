"""A tiny random-weight Gemma 3 checkpoint in the Hugging Face format, for tests and smoke runs.

    from otprune.hf.gemma3_tiny import write_tiny_gemma3
    folder = write_tiny_gemma3("/tmp/tiny-gemma3")
    processor = AutoProcessor.from_pretrained(folder)                        # offline
    model = Gemma3ForConditionalGeneration.from_pretrained(folder)

Gemma 3's layout at toy scale: a 2-layer SigLIP tower of width 32 on 64 px images (8 px patches:
8 x 8 patches, average-pooled 2 x 2 to 16 tokens per image), an LLM of 2 layers of width 64 (one
sliding-window layer with a 12-token window, one global layer; the image tokens of one image
attend to each other both ways), Gemma's chat format (`<start_of_turn>user ... <end_of_turn>`,
an image part is `<start_of_image>`, expanded by the processor to
`\\n\\n<start_of_image>` + 16 x `<image_soft_token>` + `<end_of_image>\\n\\n`), a byte-level
tokenizer built here (`otprune.hf.tiny.build_tokenizer`). Seeded weights, init range 0.1.
"""

from __future__ import annotations

from pathlib import Path

from otprune.hf.tiny import INIT_RANGE, LLM, TOWER, _vocab_size, build_tokenizer, save_random_model

IMAGE_SIZE = 64
PATCH_SIZE = 8
TOKENS_PER_IMAGE = 16  # (64 / 8)^2 = 64 patches, pooled 2 x 2
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
            "<image_soft_token>"]  # fmt: skip
NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_processor():
    """Gemma 3's processor around the tiny tokenizer, 64 px images, 16 tokens per image."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer = build_tokenizer(SPECIALS, bos=False, named=NAMED)
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=TOKENS_PER_IMAGE, chat_template=CHAT_TEMPLATE
    )


def write_tiny_gemma3(path: str | Path, seed: int = 0, **text_overrides) -> Path:
    """Write the tiny Gemma 3 checkpoint (model, processor, tokenizer, chat template) to `path`; return it.
    `text_overrides`: LLM config keys to change (e.g. `otprune.serve.tiny`'s head size 32 for vLLM)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    processor = build_processor()
    tokenizer = processor.tokenizer
    options = {
        **LLM, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 12,
        "layer_types": ["sliding_attention", "full_attention"], "vocab_size": _vocab_size(tokenizer),
        "max_position_embeddings": 1024, "initializer_range": INIT_RANGE, "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }  # fmt: skip
    text = Gemma3TextConfig(**{**options, **text_overrides})
    vision = SiglipVisionConfig(**TOWER, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    ids = {name: tokenizer.convert_tokens_to_ids(NAMED[key]) for name, key in
           (("boi_token_index", "boi_token"), ("eoi_token_index", "eoi_token"), ("image_token_index", "image_token"))}  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE, initializer_range=INIT_RANGE,
        tie_word_embeddings=False, **ids,
    )  # fmt: skip
    return save_random_model(Gemma3ForConditionalGeneration, config, processor, path, seed)
