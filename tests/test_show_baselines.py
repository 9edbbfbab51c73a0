"""`otprune show` draws VisionZip's and CDPruner's kept tokens (the 2025 baselines)."""

from __future__ import annotations

import pytest
from PIL import Image

from otprune.analysis import pictures as show
from otprune.cli import main


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("show") / "scene.png"
    show.draw_example_scene(240, 180).save(path)
    return str(path)


@pytest.mark.parametrize("v16", [False, True], ids=["llava-1.5", "llava-1.6-anyres"])
def test_show_draws_visionzip_and_cdpruner(scene, tmp_path, tmp_path_factory, capsys, v16):
    tiny = pytest.importorskip("llava.tiny")
    model = str(tiny.write_tiny_llava(tmp_path_factory.mktemp("tiny"), v16=v16))
    out = tmp_path / "kept.png"
    code = main(["show", scene, "--model", model, "--methods", "otprune,visionzip,cdpruner", "--ratio", "0.5",
                 "--panel", "96", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == show.layout(3, 2 if v16 else 1, 96, 3 if v16 else 2)["size"]
    printed = capsys.readouterr().out
    assert "merged tokens, --ratio" in printed and "no instruction: every relevance 1" in printed


def test_visionzip_needs_a_model(scene, tmp_path, capsys):
    assert main(["show", scene, "--methods", "visionzip", "--out", str(tmp_path / "x.png")]) == 2
    assert "visionzip need the CLS attention" in capsys.readouterr().err


# ---------------------------------------------------------------- DART (and FastV): inside the LLM
@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory):
    """Tiny LLaVA-1.5 / 1.6 checkpoints with 4 decoder layers (DART acts at layer 2)."""
    tiny = pytest.importorskip("llava.tiny")
    return {v16: str(tiny.write_tiny_llava(tmp_path_factory.mktemp("deep"), v16=v16, seed=3, layers=4, kv_heads=2))
            for v16 in (False, True)}  # fmt: skip


@pytest.mark.parametrize("v16", [False, True], ids=["llava-1.5", "llava-1.6-anyres"])
def test_show_draws_dart_and_fastv(scene, tmp_path, capsys, deep_tiny, v16):
    out = tmp_path / "kept.png"
    code = main(["show", scene, "--model", deep_tiny[v16], "--methods", "otprune,dart,fastv", "--ratio", "0.5",
                 "--panel", "96", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == show.layout(3, 2 if v16 else 1, 96, 3 if v16 else 2)["size"]
    printed = capsys.readouterr().out
    assert "dart" in printed and "inside the LLM at layer 2, the model's prefill" in printed


def test_dart_kept_tokens_equal_the_oracle(scene, deep_tiny):
    """The tokens `show` draws for DART = the numpy oracle on keys / normed states written from the Llama
    equations (tests/llava/inllm_utils.dart_reference) on the same prompt."""
    import sys
    from pathlib import Path

    from llava.mm_utils import process_images

    sys.path.insert(0, str(Path(__file__).parent / "llava"))
    from inllm_utils import dart_reference
    from llava_test_utils import chat_prompt, token_ids

    from otprune.commands.show_cmd import DEFAULT_QUESTION, in_llm_selection, load_model, model_views

    model, processor = load_model(deep_tiny[False])
    picture = Image.open(scene).convert("RGB")
    features, _ = model_views(model, processor, picture)
    for ratio in (0.5, 0.25):
        model.set_pruning(None)
        kept = in_llm_selection(model, processor, picture, "dart", ratio)
        assert getattr(model, "_prune_override", None) is None  # restored: the model reads the environment again
        ids = token_ids(model.instruction_tokenizer, chat_prompt(DEFAULT_QUESTION))
        px = process_images([picture], processor, model.config)
        want, (start, end) = dart_reference(model, ids, px, [picture.size], 2, ratio)
        assert end - start == features.shape[0]
        assert kept.tolist() == want, ratio
        assert len(set(want)) == len(want) < features.shape[0]


def test_dart_needs_a_model_and_enough_layers(scene, tmp_path, tmp_path_factory, capsys):
    assert main(["show", scene, "--methods", "dart", "--out", str(tmp_path / "x.png")]) == 2
    assert "dart prune inside the LLM" in capsys.readouterr().err
    tiny = pytest.importorskip("llava.tiny")
    shallow = str(tiny.write_tiny_llava(tmp_path_factory.mktemp("shallow")))  # 2 decoder layers
    assert main(["show", scene, "--model", shallow, "--methods", "dart", "--out", str(tmp_path / "x.png")]) == 2
    assert "acts at decoder layer 2, but the model has 2 layers" in capsys.readouterr().err
