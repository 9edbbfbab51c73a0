"""Tiny checkpoints and `load_pretrained_model`: original format, offline loading, variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.tiny import write_tiny_llava
from safetensors.torch import load_file

from otprune.cli import main


def _load(path, name=None, **kwargs):
    kwargs.setdefault("device_map", "cpu")
    return load_pretrained_model(str(path), None, name or Path(path).name, **kwargs)


def test_tiny_checkpoint_is_in_the_original_format(tiny_llava_v15_path, tiny_llava_v16_path):
    for path, v16 in [(tiny_llava_v15_path, False), (tiny_llava_v16_path, True)]:
        folder = Path(path)
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava_llama"
        assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
        assert Path(config["mm_vision_tower"]).is_dir()
        for name in ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"]:
            assert (folder / name).is_file()
        tower = Path(config["mm_vision_tower"])
        assert {p.name for p in tower.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
        assert all(k.startswith("vision_model.") for k in load_file(str(tower / "model.safetensors")))
        keys = load_file(str(folder / "model.safetensors"))
        assert "model.mm_projector.0.weight" in keys and "lm_head.weight" in keys
        assert all(v.dtype == torch.float16 for v in keys.values())
        assert ("model.image_newline" in keys) == v16
        assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in keys) == v16
        assert (config.get("image_aspect_ratio"), config.get("mm_patch_merge_type")) == (
            ("anyres", "spatial_unpad") if v16 else ("pad", None)
        )


def test_tiny_checkpoint_is_seeded(tmp_path):
    a = write_tiny_llava(tmp_path / "a-llava", seed=3)
    b = write_tiny_llava(tmp_path / "b-llava", seed=3)
    c = write_tiny_llava(tmp_path / "c-llava", seed=4)
    for name in ["model.safetensors", "tokenizer.model", "clip_vision_tower/model.safetensors"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="seed"):
        write_tiny_llava(tmp_path / "d", seed="1")


def test_loaded_models_and_vision_tower_sources(tiny_v15, tiny_v16):
    for tiny in (tiny_v15, tiny_v16):
        assert isinstance(tiny.model, LlavaLlamaForCausalLM)
        assert tiny.model.dtype == torch.float32  # CPU default
        assert tiny.model.config.model_type == "llava_llama"
        assert tiny.model.config._attn_implementation == "sdpa"
        assert tiny.image_processor.crop_size["height"] == 32
        assert tiny.model.get_vision_tower().is_loaded
    # LLaVA-1.5: the tower's weights come from mm_vision_tower; LLaVA-1.6: from the checkpoint.
    tower_dir = Path(tiny_v15.model.config.mm_vision_tower)
    own = load_file(str(tower_dir / "model.safetensors"))["vision_model.encoder.layers.0.mlp.fc1.weight"]
    v15 = tiny_v15.model.get_vision_tower().vision_tower.state_dict()["encoder.layers.0.mlp.fc1.weight"]
    torch.testing.assert_close(v15, own)
    ckpt = load_file(str(Path(tiny_v16.path) / "model.safetensors"))
    tuned = ckpt["model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"].float()
    v16 = tiny_v16.model.get_vision_tower().vision_tower.state_dict()["encoder.layers.0.mlp.fc1.weight"]
    torch.testing.assert_close(v16, tuned)
    assert not torch.allclose(tuned, own.half().float())
    newline = ckpt["model.image_newline"].float()
    torch.testing.assert_close(tiny_v16.model.get_model().image_newline.detach(), newline)


def test_load_returns_the_original_tuple(tiny_llava_v15_path):
    tokenizer, model, processor, context_len = _load(tiny_llava_v15_path, device="cpu", dtype=torch.float16)
    assert context_len == 2048 and model.dtype == torch.float16 and model.device.type == "cpu"
    assert tokenizer.eos_token_id == 2 and processor is model.get_vision_tower().image_processor
    # lmms-eval passes these keywords
    _, model, _, _ = _load(tiny_llava_v15_path, multimodal=True, attn_implementation="eager", customized_config=None)
    assert model.config._attn_implementation == "eager"


def test_model_type_llava_moved_directory_and_any_name(tiny_llava_v15_path, tmp_path):
    """config.json saying "llava", a directory without "llava" in its name, moved elsewhere."""
    moved = tmp_path / "some-checkpoint"
    shutil.copytree(tiny_llava_v15_path, moved)
    config = json.loads((moved / "config.json").read_text())
    config["model_type"] = "llava"
    config["mm_vision_tower"] = "/nonexistent/place/clip_vision_tower"
    (moved / "config.json").write_text(json.dumps(config))
    _, model, processor, _ = _load(moved, name="some-checkpoint")
    assert isinstance(model, LlavaLlamaForCausalLM) and processor is not None
    assert Path(model.config.mm_vision_tower) == moved / "clip_vision_tower"


def test_customized_config_overrides(tiny_llava_v15_path, tmp_path):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"image_aspect_ratio": "square"}))
    _, model, _, _ = _load(tiny_llava_v15_path, customized_config=str(override))
    assert model.config.image_aspect_ratio == "square"
    with pytest.raises(FileNotFoundError, match="customized_config"):
        _load(tiny_llava_v15_path, customized_config=str(tmp_path / "missing.json"))


def test_projector_only_checkpoint_on_a_base(tiny_llava_v15_path, tmp_path):
    """model_base: LLM weights from the base, mm_projector.bin from model_path."""
    proj_dir = tmp_path / "llava-projector-only"
    proj_dir.mkdir()
    shutil.copy(Path(tiny_llava_v15_path) / "config.json", proj_dir / "config.json")
    weights = {f"model.mm_projector.{k}": torch.full(v, 0.5) for k, v in [("0.weight", (64, 32)), ("0.bias", (64,)), ("2.weight", (64, 64)), ("2.bias", (64,))]}
    torch.save(weights, proj_dir / "mm_projector.bin")
    _, model, _, _ = load_pretrained_model(str(proj_dir), tiny_llava_v15_path, proj_dir.name, device_map="cpu")
    assert bool((model.get_model().mm_projector[0].weight == 0.5).all())
    base = load_file(str(Path(tiny_llava_v15_path) / "model.safetensors"))["lm_head.weight"].float()
    torch.testing.assert_close(model.lm_head.weight.detach(), base)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "llava_mistral"}, "not supported.*llava-v1.6-mistral-7b-hf.*`--model llava_hf` \\(pruned by the same"),
        ({"model_type": "llava_qwen"}, "not supported.*llava-onevision-qwen2-7b-ov-hf.*`--model llava_hf` \\(pruned"),
        ({"text_config": {}, "architectures": ["LlavaForConditionalGeneration"]},
         "transformers-format.*`--model llava_hf` \\(pruned by the same .*--model llava_hf --model_args pretrained="),
        ({"mm_vision_tower": None}, "mm_vision_tower"),
    ],
)
def test_unsupported_checkpoints_are_refused_clearly(tiny_llava_v15_path, tmp_path, change, match):
    folder = tmp_path / "llava-bad"
    shutil.copytree(tiny_llava_v15_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    if change.get("mm_vision_tower", 1) is None:
        config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        _load(folder, multimodal=True)


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["tiny-llava", str(tmp_path / "cli-llava"), "--v16", "--seed", "2"]) == 0
    assert "LLaVA-1.6" in capsys.readouterr().out
    config = json.loads((tmp_path / "cli-llava" / "config.json").read_text())
    assert config["image_aspect_ratio"] == "anyres"
    assert main(["tiny-llava", str(tmp_path / "plain")]) == 0
    assert "note:" in capsys.readouterr().out
    (tmp_path / "afile").write_text("x")
    assert main(["tiny-llava", str(tmp_path / "afile")]) == 2
