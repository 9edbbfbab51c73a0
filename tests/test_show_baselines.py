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
