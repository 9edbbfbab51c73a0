"""A tiny random-weight Qwen2.5-VL checkpoint in the Hugging Face format, for tests and smoke runs.

    from otprune.hf.qwen2_5_vl_tiny import write_tiny_qwen2_5_vl
    folder = write_tiny_qwen2_5_vl("/tmp/tiny-qwen2_5_vl")
    processor = AutoProcessor.from_pretrained(folder)                          # offline
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)

The directory holds what a hub checkpoint holds, at toy scale: config.json
(`Qwen2_5_VLForConditionalGeneration`: 2 decoder layers of width 64, a 2-block vision tower of
width 32 with 14 px patches and 2 x 2 spatial merge), model.safetensors (fp32),
generation_config.json, a byte-level BPE tokenizer built here (the 256 byte symbols, no merges,
plus Qwen's special tokens), the Qwen2-VL image and video processors with small pixel budgets
(an image gives 4 to 36 visual tokens; a 112 x 168 image gives 4 x 6 = 24) and a chat template
in Qwen's format. Weights are random but seeded (the same seed writes the same weights) and
larger than the usual init, so that positions and pruning visibly change the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Special tokens of Qwen2.5-VL, in the order they get ids after the 256 byte symbols.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
N_BYTES = 256
VOCAB_SIZE = 272  # 256 bytes + 7 special tokens, rounded up to a multiple of 16
SPECIAL_IDS = {token: N_BYTES + i for i, token in enumerate(SPECIAL_TOKENS)}

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # pixels per merged visual token side: 28
MIN_PIXELS = FACTOR * FACTOR * 4  # at least 4 visual tokens per image
MAX_PIXELS = FACTOR * FACTOR * 36  # at most 36 visual tokens per image

TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width)
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
}
VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "window_size": 56,  # 2 x 2 merged tokens per attention window
    "fullatt_block_indexes": [1],
    "out_hidden_size": TEXT["hidden_size"],
    "tokens_per_second": 2,
}

# Qwen's chat format: a default system turn, then `<|im_start|>{role}\n{content}<|im_end|>\n` per
# message; an image part becomes `<|vision_start|><|image_pad|><|vision_end|>` (the processor
# expands the pad to the image's token count), a video part the same with `<|video_pad|>`.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer: ids 0..255 are the byte symbols (no merges), 256.. Qwen's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    if len(vocab) != N_BYTES:
        raise RuntimeError(f"byte-level alphabet has {len(vocab)} symbols, expected {N_BYTES}")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    for token, index in SPECIAL_IDS.items():
        if backend.token_to_id(token) != index:
            raise RuntimeError(f"special token {token} got id {backend.token_to_id(token)}, expected {index}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=TEXT["max_position_embeddings"],
        padding_side="right",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor():
    """Qwen2.5-VL's processor around the tiny tokenizer and the Qwen2-VL image / video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    common = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE}
    image_processor = Qwen2VLImageProcessor(**sizes, **common)
    video_processor = Qwen2VLVideoProcessor(**sizes, **common)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config():
    """The tiny `Qwen2_5_VLConfig`."""
    from transformers import Qwen2_5_VLConfig

    text = {
        **TEXT,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
        "eos_token_id": SPECIAL_IDS["<|im_end|>"],
        "pad_token_id": SPECIAL_IDS["<|endoftext|>"],
        "initializer_range": 0.02,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION),
        image_token_id=SPECIAL_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights, larger than the default init so attention (and so positions) matters.

    Norm weights ~ 1 + N(0, 0.1^2); biases N(0, 0.05^2); embeddings N(0, 1); matrices
    N(0, (1.2 / sqrt(fan_in))^2) (patch embedding: fan_in = its input size).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("bias"):
                value = 0.05 * noise
            elif name.endswith("embed_tokens.weight"):
                value = noise
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                value = noise * (1.2 / fan_in**0.5)
            param.copy_(value.to(param.dtype))


def save_tiny(path: str | Path, model: torch.nn.Module, processor, seed: int) -> Path:
    """Seed `model`'s weights (`_randomize`), give it Qwen's greedy generation config and write it
    with `processor` to `path` (created); return the folder. Shared by the Qwen-family writers."""
    from transformers import GenerationConfig

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    _randomize(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_IDS["<|endoftext|>"],
        eos_token_id=[SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]],
        pad_token_id=SPECIAL_IDS["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint (model, processor, tokenizer, chat template) to `path`; return it.

    Loadable offline by `AutoProcessor.from_pretrained(path)`, `AutoTokenizer.from_pretrained(path)`
    and `Qwen2_5_VLForConditionalGeneration.from_pretrained(path)`.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    return save_tiny(path, Qwen2_5_VLForConditionalGeneration(build_config()), build_processor(), seed)
