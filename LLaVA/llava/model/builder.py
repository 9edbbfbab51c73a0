"""`load_pretrained_model`: load an original LLaVA checkpoint (local directory or hub id).

    from llava.model.builder import load_pretrained_model
    from llava.mm_utils import get_model_name_from_path

    path = "liuhaotian/llava-v1.5-7b"
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        path, None, get_model_name_from_path(path), device_map="cuda:0")

Same name, signature and return value as the original LLaVA builder, and it accepts the
extra keywords lmms-eval passes (`multimodal`, `attn_implementation`, `customized_config`).
A checkpoint is treated as LLaVA when its config.json names a vision tower
(`mm_vision_tower`) or says `"model_type": "llava_llama"` / `"llava"`, whatever the model
name; a config without either is loaded as a plain causal LM (as the original does for names
without "llava").
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")
UNSUPPORTED_TYPES = {"llava_mistral": "Mistral", "llava_mpt": "MPT", "llava_qwen": "Qwen", "llava_gemma": "Gemma"}
# Their transformers-format counterparts, which lmms-eval's `--model llava_hf` runs, pruned by the same
# switches (otprune's entry point registers `llava_hf`).
HF_COUNTERPARTS = {"llava_mistral": "llava-hf/llava-v1.6-mistral-7b-hf", "llava_qwen": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}
PRUNING_HF_MODEL = "lmms-eval's `--model llava_hf` (pruned by the same BASELINE / LAYER_INDEX / SUBSET_RATIO switches)"


def read_config_dict(model_path: str, **hub_kwargs) -> dict:
    """config.json of a local directory or a hub repository, as a dict."""
    local = Path(model_path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(model_path).is_dir():
        raise FileNotFoundError(f"model_path={model_path!r}: no config.json in this directory")
    from transformers.utils import cached_file

    return json.loads(Path(cached_file(model_path, "config.json", **hub_kwargs)).read_text())


def is_llava_config(config: dict) -> bool:
    return bool(config.get("mm_vision_tower")) or str(config.get("model_type", "")).startswith("llava")


def llava_config_from_dict(config: dict, model_path: str = "") -> LlavaConfig:
    """Our LlavaConfig from an original LLaVA config.json (model_type "llava_llama" or "llava")."""
    config = dict(config)
    model_type = str(config.get("model_type", ""))
    if "text_config" in config or "LlavaForConditionalGeneration" in (config.get("architectures") or []):
        raise ValueError(
            f"{model_path}: this is a transformers-format LLaVA checkpoint (e.g. llava-hf/...), not an original one; "
            f"run it with {PRUNING_HF_MODEL}: --model llava_hf --model_args pretrained={model_path}; "
            "this loader reads the original checkpoints (e.g. liuhaotian/llava-v1.5-7b)"
        )
    if model_type in UNSUPPORTED_TYPES:
        counterpart = HF_COUNTERPARTS.get(model_type)
        hint = (f"; its transformers-format checkpoint (e.g. {counterpart}) runs with {PRUNING_HF_MODEL}"
                if counterpart else "")
        raise ValueError(
            f"{model_path}: model_type={model_type!r} (LLaVA on {UNSUPPORTED_TYPES[model_type]}) is not supported; "
            f"this package runs the Llama/Vicuna based LLaVA-1.5 and LLaVA-1.6 checkpoints{hint}"
        )
    if not config.get("mm_vision_tower"):
        raise ValueError(
            f"{model_path}: config.json has no 'mm_vision_tower'; not an original-format LLaVA checkpoint"
        )
    config["model_type"] = LlavaConfig.model_type
    if config.get("rope_scaling", 0) is None:  # "null" in LLaVA configs: plain RoPE
        del config["rope_scaling"]
    return LlavaConfig.from_dict(config)


def _resolve_tower(name: str, model_path: str) -> str:
    """A local tower path that moved with the checkpoint directory is looked up inside it."""
    if not name or Path(name).exists():
        return name
    if Path(model_path).is_dir():
        for candidate in (Path(model_path) / name, Path(model_path) / Path(name).name):
            if candidate.exists():
                return str(candidate)
    return name


def _apply_overrides(config: LlavaConfig, overrides) -> None:
    if overrides is None:
        return
    if isinstance(overrides, (str, os.PathLike)):
        path = Path(overrides)
        if not path.is_file():
            raise FileNotFoundError(f"customized_config={str(overrides)!r}: no such JSON file")
        overrides = json.loads(path.read_text())
    elif hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    if not isinstance(overrides, dict):
        raise ValueError(f"customized_config: expected a JSON path, a dict or a config, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if key not in ("model_type", "architectures", "transformers_version"):
            setattr(config, key, value)


def _check_sentencepiece(path: str) -> None:
    """A clear error for sentencepiece/protobuf pairs that cannot read tokenizer.model."""
    folder = Path(path)
    if not (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
        return
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except ImportError:
        return  # transformers then uses its own copy of the proto
    except Exception as err:  # protobuf runtime older than the generated code
        raise ImportError(
            f"cannot read {folder / 'tokenizer.model'}: the installed sentencepiece and protobuf do not match ({err}); "
            "install 'sentencepiece<0.2.3' or a protobuf at least as new as the message asks for"
        ) from err


def _target_is_cpu(device_map) -> bool:
    if device_map is None:
        return True
    if isinstance(device_map, dict):
        return all(str(v).startswith("cpu") or v == "disk" for v in device_map.values())
    text = str(device_map)
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return not torch.cuda.is_available()
    return text.startswith("cpu")


def load_pretrained_model(
    model_path,
    model_base,
    model_name,
    load_8bit=False,
    load_4bit=False,
    device_map="auto",
    device="cuda",
    use_flash_attn=False,
    **kwargs,
):
    """Load a LLaVA checkpoint: returns (tokenizer, model, image_processor, context_len).

    Args:
        model_path: local directory or hub id of the checkpoint.
        model_base: base LLM for projector-only checkpoints (a directory with config.json and
            mm_projector.bin), else None. LoRA checkpoints are not supported.
        model_name: e.g. `get_model_name_from_path(model_path)`; only used to name things in
            messages (LLaVA is detected from config.json).
        load_8bit / load_4bit: bitsandbytes quantisation.
        device_map: as transformers' `from_pretrained` ("auto", "cpu", "cuda:0", a dict ...).
        device: anything but "cuda" puts the whole model there (device_map={"": device}).
        use_flash_attn: flash-attention 2 (must be installed); default attention is sdpa.
        **kwargs: `dtype`/`torch_dtype` (default float16, float32 when loading on CPU),
            `attn_implementation`, `multimodal` (require a LLaVA checkpoint),
            `customized_config` / `overwrite_config` (JSON path or dict of config overrides),
            and hub options (`cache_dir`, `revision`, `token`, `local_files_only`, ...).
    """
    model_path = str(model_path)
    multimodal = kwargs.pop("multimodal", False)
    overrides = [kwargs.pop("customized_config", None), kwargs.pop("overwrite_config", None)]
    attn = kwargs.pop("attn_implementation", None)
    if kwargs.pop("use_flash_attention_2", False):
        use_flash_attn = True
    if use_flash_attn:
        attn = "flash_attention_2"
    attn = attn or "sdpa"
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ImportError("use_flash_attn / attn_implementation='flash_attention_2': flash-attn is not installed")
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}

    if str(device) != "cuda":
        device_map = {"": device}
    load: dict = {"device_map": device_map, "attn_implementation": attn, **kwargs}
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if load_8bit
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=torch.float16,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_quant_type="nf4",
            )
        )
    load["dtype"] = dtype if dtype is not None else (torch.float32 if _target_is_cpu(device_map) else torch.float16)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_dict = read_config_dict(model_path, **hub)
    if not is_llava_config(config_dict):
        if multimodal:
            llava_config_from_dict(config_dict, model_path)  # raises the specific error
        _check_sentencepiece(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False, **hub)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        return tokenizer, model, None, getattr(model.config, "max_sequence_length", 2048)

    if "lora" in str(model_name).lower() and model_base is not None:
        raise ValueError(f"{model_name}: LoRA checkpoints are not supported; merge the LoRA weights into the LLM first")
    config = llava_config_from_dict(config_dict, model_path)
    for override in overrides:
        _apply_overrides(config, override)
    config.mm_vision_tower = _resolve_tower(config.mm_vision_tower, model_path)

    weights_path = model_path if model_base is None else str(model_base)
    _check_sentencepiece(weights_path)
    tokenizer = AutoTokenizer.from_pretrained(weights_path, use_fast=False, config=config, **hub)
    model, info = LlavaLlamaForCausalLM.from_pretrained(weights_path, config=config, output_loading_info=True, **load)
    if model_base is not None:
        _load_projector(model, model_path, hub)

    added = []
    if getattr(config, "mm_use_im_patch_token", True):
        added += [DEFAULT_IMAGE_PATCH_TOKEN]
    if getattr(config, "mm_use_im_start_end", False):
        added += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    _load_vision_tower(model, info)
    model.instruction_tokenizer = tokenizer  # CDPruner reads each prompt's instruction with it
    image_processor = model.get_vision_tower().image_processor
    context_len = getattr(config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len


def _load_vision_tower(model: LlavaLlamaForCausalLM, info: dict) -> None:
    """Fill in the tower's weights the checkpoint did not have, from `mm_vision_tower`."""
    tower = model.get_vision_tower()
    prefix = "model.vision_tower.vision_tower."
    expected = [key for key in model.state_dict() if key.startswith(prefix)]
    record = getattr(model.get_model(), "_tower_weights_missing", None)
    if record is not None:
        missing, total = record
    else:  # transformers did not call our hook: read the loading report instead
        missing, total = sum(1 for key in info.get("missing_keys", ()) if key.startswith(prefix)), len(expected)
    if missing == 0:
        tower.is_loaded = True
    elif missing == total:
        tower.load_model()
    else:
        raise ValueError(
            f"the checkpoint has {total - missing} of the vision tower's {total} weights "
            "(model.vision_tower.vision_tower.*); it must have all of them or none"
        )


def _load_projector(model: LlavaLlamaForCausalLM, model_path: str, hub: dict) -> None:
    """Projector-only checkpoints (pre-training stage): mm_projector.bin on top of `model_base`."""
    local = Path(model_path) / "mm_projector.bin"
    if not local.is_file():
        from transformers.utils import cached_file

        local = Path(cached_file(model_path, "mm_projector.bin", **hub))
    weights = torch.load(local, map_location="cpu", weights_only=True)
    projector = model.get_model().mm_projector
    state = {}
    for key, value in weights.items():
        name = key.split("mm_projector.", 1)[-1]
        state[name] = value
    param = next(projector.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        projector.load_state_dict({k: v.to(param) for k, v in state.items()}, strict=True)
