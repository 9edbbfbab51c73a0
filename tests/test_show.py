"""`otprune show`: the fixed pixel projection, the drawing, and the command with and without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from otprune.analysis import pictures as show
from otprune.cli import main


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("show") / "scene.png"
    show.draw_example_scene(240, 180).save(path)
    return str(path)


def test_patch_features_are_the_documented_projection():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)  # square already and the target size: no padding, no resampling
    out_pixels, features = show.patch_features(image, grid=2, patch=2, dim=5, seed=3)
    np.testing.assert_array_equal(out_pixels, pixels)
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(12, 5, generator=g) / np.sqrt(5)
    for row in range(2):
        for col in range(2):
            patch = pixels[2 * row : 2 * row + 2, 2 * col : 2 * col + 2].astype(np.float32) / 127.5 - 1.0
            expect = torch.from_numpy(patch.reshape(-1)) @ proj
            torch.testing.assert_close(features[row * 2 + col], expect, rtol=1e-5, atol=1e-5)


def test_patch_features_pad_to_square_and_are_reproducible():
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    pixels, features = show.patch_features(image, grid=4, patch=7)
    assert pixels.shape == (28, 28, 3) and features.shape == (16, 256)
    assert tuple(pixels[0, 14]) == show.PAD_COLOUR and tuple(pixels[14, 14]) == (255, 0, 0)
    torch.testing.assert_close(features, show.patch_features(image, grid=4, patch=7)[1])
    with pytest.raises(ValueError, match="grid"):
        show.patch_features(image, grid=0)


def test_highlight_keeps_kept_cells_and_dims_the_rest():
    pixels = np.full((40, 40, 3), 200, dtype=np.uint8)
    kept = np.zeros((4, 4), dtype=bool)
    kept[1, 2] = True
    covered = np.ones((4, 4), dtype=bool)
    covered[3, 3] = False
    out = np.asarray(show.highlight(pixels, covered, kept))
    assert tuple(out[15, 25]) == (200, 200, 200)  # inside the kept cell
    assert tuple(out[10, 20]) == show.OUTLINE  # its outline
    assert out[5, 5].max() < 100  # dimmed
    assert {tuple(out[y, x]) for y in range(30, 40) for x in range(30, 40)} >= {(90, 90, 90)}  # hatched


def test_view_rejects_bad_cells():
    with pytest.raises(ValueError, match="cells"):
        show.View("v", np.zeros((4, 4, 3), np.uint8), 2, 2, torch.tensor([0, 1, 4]))


def _panels_are_separated(path: str, geometry: dict) -> None:
    figure = np.asarray(Image.open(path).convert("RGB"))
    boxes = geometry["boxes"][0]
    for (_, top, right, bottom), (left_next, *_rest) in zip(boxes[:-1], boxes[1:], strict=True):
        gutter = figure[top:bottom, right:left_next]
        assert (gutter == 255).all()  # white between panels
    for left, top, right, bottom in boxes:
        assert (figure[top:bottom, left:right] != 255).any(axis=-1).mean() > 0.5  # a picture in each panel


@pytest.mark.parametrize("methods", ["otprune,divprune,random", "otprune", "dpp,uniform,first_k,last_k"])
def test_show_writes_one_panel_per_method(scene, tmp_path, capsys, methods):
    out = tmp_path / "kept.png"
    assert main(["show", scene, "--methods", methods, "--ratio", "0.1", "--panel", "120", "--out", str(out)]) == 0
    n = len(methods.split(","))
    geometry = show.layout(n, 1, 120, 2)
    assert Image.open(out).size == geometry["size"]
    _panels_are_separated(str(out), geometry)
    printed = capsys.readouterr().out
    assert printed.count("W2 = ") == n and "58/576" in printed  # round(0.1 * 576)


def test_show_errors(scene, tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["show", scene, "--methods", "otprune,nosuch", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown selection method" in capsys.readouterr().err
    not_image = tmp_path / "text.png"
    not_image.write_text("hello")
    assert main(["show", str(not_image), "--out", str(tmp_path / "x.png")]) == 2
    with pytest.raises(SystemExit):
        main(["show", scene, "--ratio", "1.5"])


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """write(v16) -> a tiny random-weight LLaVA checkpoint directory, written once per layout."""
    tiny = pytest.importorskip("llava.tiny", reason="the llava package (LLaVA/llava) is not available")
    written: dict[bool, str] = {}

    def write(v16: bool) -> str:
        if v16 not in written:
            folder = tmp_path_factory.mktemp("tiny-llava-v16" if v16 else "tiny-llava")
            try:
                written[v16] = str(tiny.write_tiny_llava(folder, v16=v16))
            except Exception as err:  # another component's writer; skip, do not fail, if it cannot run
                pytest.skip(f"cannot write a tiny LLaVA checkpoint: {err}")
        return written[v16]

    return write


@pytest.mark.parametrize("v16", [False, True], ids=["llava-1.5", "llava-1.6-anyres"])
def test_show_with_a_tiny_llava_model(scene, tmp_path, capsys, tiny_llava, v16):
    model = tiny_llava(v16)
    out = tmp_path / "kept.png"
    code = main(["show", scene, "--model", model, "--methods", "otprune,random", "--ratio", "0.25", "--panel", "96", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    views = 2 if v16 else 1
    geometry = show.layout(2, views, 96, 3 if v16 else 2)
    assert Image.open(out).size == geometry["size"]
    _panels_are_separated(str(out), geometry)
    assert "from model" in printed
    if not v16:
        assert "4/16" in printed  # a 4 x 4 grid of tokens, a quarter kept


@pytest.fixture(scope="module")
def position_coded_llava16(tiny_llava):
    """A tiny LLaVA-1.6 whose encode_images returns feature[p, t] = (p, t, 0, ...)."""
    from otprune.commands.show_cmd import load_model

    model, processor = load_model(tiny_llava(True))
    side = model.get_vision_tower().num_patches_per_side

    def encode(crops):
        out = torch.zeros(crops.shape[0], side * side, model.config.hidden_size, dtype=crops.dtype)
        out[:, :, 0] = torch.arange(crops.shape[0], dtype=crops.dtype)[:, None]
        out[:, :, 1] = torch.arange(side * side, dtype=crops.dtype)[None, :]
        return out

    model.encode_images = encode
    return model, processor, side


@pytest.mark.parametrize("size", [(240, 180), (60, 150), (150, 40), (64, 64)])
def test_anyres_token_cells_follow_the_models_layout(position_coded_llava16, size):
    """Position-coded crop features through the model's own layout code land in the cells we draw."""
    from otprune.commands.show_cmd import model_views

    model, processor, side = position_coded_llava16
    features, views = model_views(model, processor, show.draw_example_scene(*size))
    base, grid = views
    grid_w = grid.cols // side
    for token in range(features.shape[0]):
        crop, t = int(features[token, 0]), int(features[token, 1])
        if base.cells[token] >= 0:
            assert crop == 0 and base.cells[token] == t
        elif grid.cells[token] >= 0:
            r_crop, c_crop = divmod(crop - 1, grid_w)
            r, c = divmod(t, side)
            assert grid.cells[token] == (r_crop * side + r) * grid.cols + c_crop * side + c
        else:  # image_newline tokens: the model's learned vector, not a crop position
            assert torch.equal(features[token], model.get_model().image_newline.float())
    assert int((base.cells >= 0).sum()) == side * side


@pytest.mark.parametrize("v16", [False, True], ids=["llava-1.5", "llava-1.6-anyres"])
def test_show_draws_prumerge_beside_otprune(scene, tmp_path, capsys, tiny_llava, v16):
    out = tmp_path / "kept.png"
    code = main(["show", scene, "--model", tiny_llava(v16), "--methods", "otprune,prumerge,prumerge+", "--ratio", "0.25",
                 "--panel", "96", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    geometry = show.layout(3, 2 if v16 else 1, 96, 3 if v16 else 2)
    assert Image.open(out).size == geometry["size"]
    _panels_are_separated(str(out), geometry)
    printed = capsys.readouterr().out
    assert printed.count("merged tokens, adaptive budget") == 2 and printed.count("W2 = ") == 3


def test_show_prumerge_needs_a_model(scene, tmp_path, capsys):
    assert main(["show", scene, "--methods", "otprune,prumerge", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "prumerge need the CLS attention" in err and "--model" in err
