"""Tiny random-weight checkpoints of transformers' LLaVA family, with a processor, built offline.

    from otprune.hf.tiny import write_tiny_llava, write_tiny_llava_next, write_tiny_onevision
    path = write_tiny_llava("/tmp/tiny-llava-hf")          # LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

Each directory is an HF-format checkpoint (config.json, model.safetensors, generation config)
plus a processor: a byte-level BPE tokenizer built here with `tokenizers` (no merges: every
byte is a token; `<image>` / `<video>` and the chat markers are special tokens), the family's
image processor at a 56 px crop size, and a chat template in the family's format. Sizes: LLM
hidden 64, 2 layers; vision tower hidden 32, 2 layers, 14 px patches (16 tokens per crop).
Weights are random but seeded: the same seed gives the same files. Nothing is downloaded; the
checkpoints load with `HF_HUB_OFFLINE=1`, and lmms-eval's `llava_hf` model accepts them.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 56  # crop side of the vision tower
PATCH_SIZE = 14  # -> 4 x 4 = 16 tokens per crop
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # anyres grids (2 x 1, 1 x 2, 2 x 2 crops)
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
INIT_RANGE = 0.1  # larger than the usual 0.02, so that pruning visibly changes the logits

# Chat templates: the prompt formats of llava-hf's LLaVA-1.5 / 1.6 (vicuna "USER: ... ASSISTANT:")
# and LLaVA-OneVision (Qwen2 "<|im_start|>role\n...<|im_end|>"), content as a string or as
# a list of {"type": "image" | "video" | "text"} parts.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}" + _CONTENT + "{{ ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}" + _CONTENT + "{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}" + _CONTENT + "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}" + _CONTENT + "{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(specials: list[str], *, bos: bool, named: dict[str, str] | None = None):
    """A byte-level BPE tokenizer with no merges (every byte is a token) and the given special tokens.

    `specials` start with the unk, bos, eos and pad tokens, in that order. With `bos`, every
    encoded text starts with the bos token (as Llama's tokenizer does). `named`: attributes for
    some of the specials (e.g. {"image_token": "<image_soft_token>"} gives `tokenizer.image_token`
    and `tokenizer.image_token_id`), as a family's processor reads them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    unk, bos_token, eos, pad = specials[:4]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*specials, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, vocab[bos_token])]
        )
    extra = [token for token in specials[4:]]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos_token,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=extra,
        padding_side="left",
        **({"extra_special_tokens": dict(named)} if named else {}),
    )


def _tower_config(kind: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    if kind == "clip":
        return CLIPVisionConfig(
            **TOWER, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32, initializer_range=INIT_RANGE
        )
    return SiglipVisionConfig(**TOWER, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)


def save_random_model(model_cls, config, processor, path: str | Path, seed: int) -> Path:
    """Build `model_cls(config)` with seeded random weights (image newline drawn too) and save it with
    `processor` (and the tokenizer's special-token ids as generation ids) into `path`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        # Random non-zero norms/biases would not change the shapes; keep transformers' init but make
        # the image newline and embeddings clearly non-trivial.
        for name, param in model.named_parameters():
            if "image_newline" in name:
                with torch.no_grad():
                    param.normal_(0.0, 1.0)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _text_config(kind: str, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(
        **LLM,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _vocab_size(tokenizer) -> int:
    return (len(tokenizer) + 7) // 8 * 8


_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def llava_config(config_cls, vision_config, text_config, tokenizer, image_size: int, **extra):
    """A LLaVA-1.5 / 1.6 `config_cls` (Llava / LlavaNext config): CLIP features of the second-to-last layer
    without the CLS token, a GELU projector, `<image>` as the image token; `extra` goes to the config."""
    return config_cls(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **extra,
    )


def _write_llama_llava(path: str | Path, seed: int, model_cls, config_cls, processor_cls, image_processor, **extra) -> Path:
    """LLaVA-1.5 / 1.6 layout: a CLIP tower, a Llama LLM, the Vicuna chat template; `extra` goes to the config."""
    tokenizer = build_tokenizer(_LLAMA_SPECIALS, bos=True)
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_TEMPLATE,
    )
    text = _text_config("llama", _vocab_size(tokenizer), tokenizer)
    config = llava_config(config_cls, _tower_config("clip"), text, tokenizer, IMAGE_SIZE, **extra)
    return save_random_model(model_cls, config, processor, path, seed)


def write_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """A tiny `LlavaForConditionalGeneration` (LLaVA-1.5 layout: CLIP tower, Llama LLM, 16 tokens per image)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return _write_llama_llava(path, seed, LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor, image_processor)


def write_tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """A tiny `LlavaNextForConditionalGeneration` (LLaVA-1.6 layout: anyres crops, unpadding, image_newline)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    return _write_llama_llava(
        path, seed, LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextProcessor, image_processor,
        image_grid_pinpoints=GRID_PINPOINTS,
    )


def write_tiny_onevision(path: str | Path, seed: int = 0) -> Path:
    """A tiny `LlavaOnevisionForConditionalGeneration` (SigLIP tower, Qwen2 LLM, anyres images, videos)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = build_tokenizer(
        ["<unk>", "<s>", "<|endoftext|>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"], bos=False
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=ONEVISION_PINPOINTS
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=QWEN_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    config = LlavaOnevisionConfig(
        vision_config=_tower_config("siglip"),
        text_config=_text_config("qwen2", _vocab_size(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    return save_random_model(LlavaOnevisionForConditionalGeneration, config, processor, path, seed)


def _clip_tokenizer_files(folder: Path) -> int:
    """A byte-level CLIP BPE vocabulary without merges (every byte and its end-of-word form); its size."""
    import json

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]  # the byte-level alphabet
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 16}))
    return len(vocab)


def write_tiny_clip(path: str | Path, vision, seed: int = 5) -> Path:
    """A full CLIP checkpoint (`CLIPModel` + `CLIPTokenizer`) at `path` whose vision weights are those of
    `vision` (a `CLIPVisionModel`, e.g. a tiny LLaVA's tower) and whose text tower is tiny and random
    (context 16): the CLIP text side CDPruner needs (`otprune.hf.clip_text`), for tests."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _clip_tokenizer_files(folder)
    projection = int(getattr(vision.config, "projection_dim", 16) or 16)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
                          projection_dim=projection)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.config.to_dict(), projection_dim=projection)
    torch.manual_seed(seed)
    clip = CLIPModel(config)
    clip.vision_model.load_state_dict(getattr(vision, "vision_model", vision).state_dict())
    clip.save_pretrained(folder)
    return folder


WRITERS = {"llava": write_tiny_llava, "llava_next": write_tiny_llava_next, "onevision": write_tiny_onevision}


def write(path: str | Path, family: str = "llava", seed: int = 0) -> Path:
    """Write the tiny checkpoint of `family` (llava, llava_next, onevision) to `path`."""
    if family not in WRITERS:
        raise ValueError(f"family={family!r}: must be one of {', '.join(WRITERS)}")
    return WRITERS[family](path, seed=seed)
