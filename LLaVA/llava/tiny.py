"""Tiny random-weight LLaVA checkpoints in the original format, for tests, demos and smoke tests.

    from llava.tiny import write_tiny_llava
    write_tiny_llava("/tmp/tiny-llava-v1.5")            # LLaVA-1.5 layout ("pad")
    write_tiny_llava("/tmp/tiny-llava-v1.6", v16=True)  # LLaVA-1.6 layout (anyres, unpad, image_newline)

The directory holds what an original checkpoint holds, at toy scale: config.json
(`LlavaLlamaForCausalLM`, model_type "llava_llama", the `mm_*` keys), model.safetensors (fp16;
keys `model.*`, `lm_head.weight`, `model.mm_projector.*`, plus `model.image_newline` and the
fine-tuned vision tower `model.vision_tower.vision_tower.vision_model.*` for 1.6), a
sentencepiece Llama tokenizer trained here on a small generated corpus, and a CLIP vision tower
directory (`clip_vision_tower/`: config.json, model.safetensors with `vision_model.*` keys,
preprocessor_config.json) named by `mm_vision_tower`. Weights are random but seeded: the same
seed writes the same files. Needs only torch, safetensors and sentencepiece (no transformers).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import Tensor

# Sizes: small enough to build and run in well under a second on a CPU.
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
IMAGE_SIZE = 32  # crop side S of the vision tower
PATCH_SIZE = 8  # -> 4 x 4 = 16 visual tokens per crop
VOCAB_SIZE = 512
# LLaVA-1.6's grid (336x672, 672x336, 672x672, 1008x336, 336x1008) at the tiny crop size.
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOWER_DIR = "clip_vision_tower"

_SYSTEM_PROMPTS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.",
    "Answer the questions.",
]
_PROMPTS = [
    "Describe the image.",
    "Describe this image in detail.",
    "What is in the picture?",
    "What is shown in the image?",
    "What color is the object?",
    "How many objects are there?",
    "Is there a cat in the image? Answer yes or no.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Provide a one-sentence caption for the provided image.",
    "Please describe the scene.",
    "Where is the dog?",
    "The image shows a red cat sitting on a blue chair next to a green plant.",
    "There are two dogs and one bird in the photo.",
    "Yes. No. A. B. C. D.",
]
_WORDS = (
    "the a an of in on at to and or is are was were be this that these those it its with for from by as "
    "image picture photo scene object objects person people man woman child dog cat bird car bus tree house "
    "red green blue yellow black white gray orange purple brown small large big little left right top bottom "
    "front back next near under above one two three four five six seven eight nine ten yes no true false "
    "question answer caption describe detail color shape count number text sign table chair plant window door "
    "sky water road street room food fruit apple banana ball book phone screen hand face head eye"
).split()


def _corpus(seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for system in _SYSTEM_PROMPTS:
        for prompt in _PROMPTS:
            lines.append(f"{system} USER: <image>\n{prompt} ASSISTANT: {prompt}</s>")
            lines.append(f"{system}###Human: {prompt}###Assistant: {prompt}")
            lines.append(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST] {prompt} </s>")
            lines.append(f"<|im_start|>system\n{system}<|im_end|><|im_start|>user\n{prompt}<|im_end|>")
    for _ in range(400):
        picks = torch.randint(len(_WORDS), (int(torch.randint(4, 14, (1,), generator=generator)),), generator=generator)
        lines.append(" ".join(_WORDS[i] for i in picks.tolist()).capitalize() + ".")
    lines += [f"{i} + {i * 7} = {i * 8}, 3.14 and 2.5%" for i in range(100)]
    return lines


def train_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> bytes:
    """A Llama-style sentencepiece BPE model (byte fallback, split digits, <unk>=0 <s>=1 </s>=2)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


class _Weights:
    """Seeded random tensors."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 0.1, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=self.generator) * std + mean


def _tower_weights(w: _Weights, prefix: str = "vision_model.") -> dict[str, Tensor]:
    c, inner, layers = TOWER["hidden_size"], TOWER["intermediate_size"], TOWER["num_hidden_layers"]
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
    out = {
        "embeddings.class_embedding": w.normal(c, std=0.5),
        "embeddings.patch_embedding.weight": w.normal(c, 3, PATCH_SIZE, PATCH_SIZE, std=0.05),
        "embeddings.position_embedding.weight": w.normal(tokens, c, std=0.2),
        "pre_layrnorm.weight": w.normal(c, std=0.1, mean=1.0),
        "pre_layrnorm.bias": w.normal(c, std=0.05),
        "post_layernorm.weight": w.normal(c, std=0.1, mean=1.0),
        "post_layernorm.bias": w.normal(c, std=0.05),
    }
    for i in range(layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{layer}self_attn.{proj}.weight"] = w.normal(c, c, std=0.2)
            out[f"{layer}self_attn.{proj}.bias"] = w.normal(c, std=0.05)
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{layer}{norm}.weight"] = w.normal(c, std=0.1, mean=1.0)
            out[f"{layer}{norm}.bias"] = w.normal(c, std=0.05)
        out[f"{layer}mlp.fc1.weight"] = w.normal(inner, c, std=0.2)
        out[f"{layer}mlp.fc1.bias"] = w.normal(inner, std=0.05)
        out[f"{layer}mlp.fc2.weight"] = w.normal(c, inner, std=0.15)
        out[f"{layer}mlp.fc2.bias"] = w.normal(c, std=0.05)
    return {prefix + key: value for key, value in out.items()}


def _llm_weights(w: _Weights, vocab: int, layers: int | None = None, kv_heads: int | None = None) -> dict[str, Tensor]:
    h, inner = LLM["hidden_size"], LLM["intermediate_size"]
    layers = LLM["num_hidden_layers"] if layers is None else layers
    kv = h if kv_heads is None else kv_heads * (h // LLM["num_attention_heads"])  # rows of k_proj / v_proj
    out = {
        "model.embed_tokens.weight": w.normal(vocab, h, std=1.0),
        "model.norm.weight": w.normal(h, std=0.1, mean=1.0),
        "lm_head.weight": w.normal(vocab, h, std=0.3),
    }
    for i in range(layers):
        layer = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{layer}self_attn.{proj}.weight"] = w.normal(kv if proj in ("k_proj", "v_proj") else h, h, std=0.15)
        out[f"{layer}mlp.gate_proj.weight"] = w.normal(inner, h, std=0.15)
        out[f"{layer}mlp.up_proj.weight"] = w.normal(inner, h, std=0.15)
        out[f"{layer}mlp.down_proj.weight"] = w.normal(h, inner, std=0.1)
        out[f"{layer}input_layernorm.weight"] = w.normal(h, std=0.1, mean=1.0)
        out[f"{layer}post_attention_layernorm.weight"] = w.normal(h, std=0.1, mean=1.0)
    return out


def _save(tensors: dict[str, Tensor], path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())}, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_tower(folder: Path, seed: int) -> dict[str, Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    weights = _tower_weights(_Weights(seed + 1))
    _save(weights, folder / "model.safetensors", torch.float32)
    _write_json(
        folder / "config.json",
        {
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            **TOWER,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "projection_dim": TOWER["hidden_size"],
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "torch_dtype": "float32",
        },
    )
    _write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": CLIP_STD,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": IMAGE_SIZE},
        },
    )
    return weights


def _write_tokenizer(folder: Path, seed: int) -> int:
    import sentencepiece as spm

    model = train_tokenizer(seed)
    (folder / "tokenizer.model").write_bytes(model)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 2048,
            "padding_side": "right",
            "sp_model_kwargs": {},
            **special,
        },
    )
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def write_tiny_llava(
    path: str | Path, v16: bool = False, seed: int = 0, *, layers: int | None = None, kv_heads: int | None = None
) -> Path:
    """Write a tiny random LLaVA-1.5 (or, with `v16`, LLaVA-1.6) checkpoint to `path`.

    `layers` sets the number of decoder layers (default 2), `kv_heads` the key/value heads
    (default: as many as the 4 query heads; 1 or 2 give grouped-query attention).
    Returns the directory. Load it with
    `load_pretrained_model(path, None, get_model_name_from_path(path), device_map="cpu")`.
    Name the directory with "llava" in it if the original LLaVA code should load it too.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers={layers!r}: must be an integer >= 1")
    heads = LLM["num_attention_heads"]
    if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1
                                 or heads % kv_heads):
        raise ValueError(f"kv_heads={kv_heads!r}: must divide the {heads} attention heads (1, 2 or 4)")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path={str(path)!r}: exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    tower = _write_tower(folder / TOWER_DIR, seed)
    vocab = _write_tokenizer(folder, seed)

    w = _Weights(seed)
    weights = _llm_weights(w, vocab, layers, kv_heads)
    h, c = LLM["hidden_size"], TOWER["hidden_size"]
    weights.update(
        {
            "model.mm_projector.0.weight": w.normal(h, c, std=0.3),
            "model.mm_projector.0.bias": w.normal(h, std=0.1),
            "model.mm_projector.2.weight": w.normal(h, h, std=0.2),
            "model.mm_projector.2.bias": w.normal(h, std=0.1),
        }
    )
    config = {
        "_name_or_path": folder.name,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        **LLM,
        "num_hidden_layers": LLM["num_hidden_layers"] if layers is None else layers,
        "num_key_value_heads": heads if kv_heads is None else kv_heads,
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.2",
        "use_cache": True,
        "vocab_size": vocab,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": c,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str((folder / TOWER_DIR).resolve()),
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if v16:
        weights["model.image_newline"] = w.normal(h, std=h**-0.5)
        # LLaVA-1.6 fine-tuned the tower and saves it in the checkpoint: a perturbed copy here.
        weights.update(
            {
                "model.vision_tower.vision_tower." + key: value + w.normal(*value.shape, std=0.02)
                for key, value in tower.items()
            }
        )
        config.update(
            {
                "image_aspect_ratio": "anyres",
                "image_grid_pinpoints": GRID_PINPOINTS,
                "mm_patch_merge_type": "spatial_unpad",
                "unfreeze_mm_vision_tower": True,
                "mm_vision_tower_lr": 2e-6,
            }
        )
    _save(weights, folder / "model.safetensors", torch.float16)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    return folder
