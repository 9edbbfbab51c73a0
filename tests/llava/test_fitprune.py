"""FitPrune on the model: calibration (`otprune fitprune-calibrate`), applying a recipe, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from inllm_utils import eager_attention, single
from llava_test_utils import noise_image

from otprune import PruneConfig
from otprune.cli import main
from otprune.methods.fitprune import FitPruneRecipe, load_recipe, save_recipe

# Tiny matrices: one thread is faster and immune to other processes on the cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calibration_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    questions = ["Describe the image.", "What is shown in the image?", "How many objects are there?"]
    lines = []
    for i, question in enumerate(questions):
        noise_image(50 + i, (36 + 8 * i, 30)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": question}))
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "calib.jsonl"


@pytest.fixture(scope="module")
def recipe_path(tiny_llava_deep_path, calibration_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "recipe.json"
    code = main(["fitprune-calibrate", "--model", tiny_llava_deep_path, "--data", str(calibration_data),
                 "--reduction", "0.12", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    return out


def test_calibrated_recipe_meets_its_flops_budget(recipe_path, tiny_llava_deep_path, capsys):
    recipe = load_recipe(recipe_path)
    assert (recipe.num_layers, recipe.hidden_size, recipe.intermediate_size, recipe.visual_tokens) == (4, 64, 128, 16)
    d, m = 64, 128
    cost = lambda tokens: sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens)  # noqa: E731
    n = recipe.text_tokens + 16
    assert cost(recipe.tokens_per_layer) <= (1 - 0.12) * cost([n] * 4)
    assert recipe.removed[0] == 0 and list(recipe.removed) == sorted(recipe.removed) and recipe.removed[-1] > 0
    data = json.loads(recipe_path.read_text())
    assert data["calibration"]["samples"] == 3 and data["flops_pruned"] == cost(recipe.tokens_per_layer)
    assert data["removed_per_layer"] == list(recipe.removed)


@torch.no_grad()
def test_applying_a_recipe_drops_exactly_its_counts(tiny_deep, recipe_path, monkeypatch):
    monkeypatch.setenv("BASELINE", "FITPRUNE")
    monkeypatch.setenv("FITPRUNE_RECIPE", str(recipe_path))
    recipe = load_recipe(recipe_path)
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=7)
    out = model(input_ids=ids[None], images=px, output_hidden_states=True)
    stats = model.pruning_stats[0]
    text = stats["text_tokens"]
    assert stats["visual_tokens_per_layer"] == recipe.kept
    assert stats["tokens_per_layer"] == [text + k for k in recipe.kept]
    assert model.pruned_layout.tokens_per_layer()[0] == stats["tokens_per_layer"]
    # hidden_states[i + 1] is the output of layer i, as long as layer i's input
    assert [h.shape[1] for h in out.hidden_states[1:]] == stats["tokens_per_layer"]
    assert (stats["method"], stats["layer"], stats["ratio"], stats["recipe"]) == ("fitprune", recipe.first_layer, None,
                                                                                   str(recipe_path))
    assert [s.layer for s in model.pruned_layout.stages[1:]] == [i for i, d in enumerate(recipe.drops) if d]


@torch.no_grad()
def test_kept_tokens_have_the_most_self_plus_cross_attention(tiny_deep, tmp_path):
    """Oracle: eager attention of the layer's input, mean over visual / later text queries."""
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=8)
    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], images=px, output_hidden_states=True)
    (start, end), = model.visual_layout.spans[0]
    layer = 2
    recipe = FitPruneRecipe(num_layers=4, hidden_size=64, intermediate_size=128, visual_tokens=16, text_tokens=50,
                            removed=(0, 0, 6, 6), reduction=0.05)
    model.set_pruning(PruneConfig(method="fitprune", recipe=save_recipe(recipe, tmp_path / "r.json")))
    model(input_ids=ids[None], images=px)
    attention = eager_attention(model, layer, ref.hidden_states[layer][0])  # (N, N)
    score = attention[start:end, start:end].mean(0) + attention[end:, start:end].mean(0)
    expected = score.topk(10).indices.sort().values
    kept = model.pruned_layout.stages[-1].source[0]
    assert torch.equal(kept[start : start + 10] - start, expected)
    assert model.pruned_layout.stages[-1].layer == layer


def test_recipe_for_another_model_is_refused(tiny_deep, recipe_path, tmp_path, monkeypatch):
    recipe = load_recipe(recipe_path)
    other = dataclasses.replace(recipe, num_layers=5, removed=(*recipe.removed, recipe.removed[-1]))
    monkeypatch.setenv("BASELINE", "FITPRUNE")
    monkeypatch.setenv("FITPRUNE_RECIPE", str(save_recipe(other, tmp_path / "other.json")))
    ids, px, sizes = single(tiny_deep)
    with pytest.raises(ValueError, match=r"computed for a model of 5 decoder layers, but this model has 4"):
        tiny_deep.model(input_ids=ids[None], images=px)


def test_bad_recipes_are_clear_errors(tmp_path, recipe_path):
    env = {"BASELINE": "FITPRUNE"}
    with pytest.raises(ValueError, match=r"FITPRUNE_RECIPE: not set, but BASELINE=FITPRUNE needs a recipe"):
        PruneConfig.from_env(env)
    with pytest.raises(FileNotFoundError, match=r"FITPRUNE_RECIPE='.*nope.json': no such file"):
        PruneConfig.from_env({**env, "FITPRUNE_RECIPE": str(tmp_path / "nope.json")})
    (tmp_path / "bad.json").write_text('{"format": "otprune-fitprune-recipe", "version": 1}')
    with pytest.raises(ValueError, match=r"missing field"):
        PruneConfig.from_env({**env, "FITPRUNE_RECIPE": str(tmp_path / "bad.json")})
    first = load_recipe(recipe_path).first_layer
    config = PruneConfig.from_env({**env, "FITPRUNE_RECIPE": str(recipe_path), "SUBSET_RATIO": "0.5"})
    assert (config.layer, config.ratio) == (first, None)
    with pytest.raises(ValueError, match=rf"FitPrune prunes where its recipe says, first at layer {first}"):
        PruneConfig.from_env({**env, "FITPRUNE_RECIPE": str(recipe_path), "LAYER_INDEX": str(first + 1)})


def test_calibrate_command_errors(tmp_path, tiny_llava_deep_path, capsys):
    out = str(tmp_path / "r.json")
    assert main(["fitprune-calibrate", "--model", tiny_llava_deep_path, "--data", str(tmp_path / "none.jsonl"),
                 "--out", out]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["fitprune-calibrate", "--model", "x", "--data", "y", "--reduction", "1.5", "--out", out]) == 2
    assert "--reduction=1.5: must be in (0, 1)" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "missing.png", "question": "q"}\n')
    assert main(["fitprune-calibrate", "--model", tiny_llava_deep_path, "--data", str(data), "--out", out]) == 2
    assert "line 1: image" in capsys.readouterr().err
    data.write_text('{"question": "q"}\n')
    assert main(["fitprune-calibrate", "--model", tiny_llava_deep_path, "--data", str(data), "--out", out]) == 2
    assert 'line 1: expected an object with string fields "image" and "question"' in capsys.readouterr().err
