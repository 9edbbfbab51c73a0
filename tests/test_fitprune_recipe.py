"""FitPrune recipes: statistics -> curves, the FLOPs-budget search (brute-force oracle), the file."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otprune import flops
from otprune.methods.fitprune import (
    CurveAccumulator,
    FitPruneRecipe,
    attention_loss_curves,
    budget,
    load_recipe,
    resample_curves,
    save_recipe,
    search_recipe,
)


def _flops(tokens, size):
    return sum(4 * n * size.hidden**2 + 2 * n * n * size.hidden + 2 * n * size.hidden * size.intermediate for n in tokens)


def test_curves_accumulate_the_smallest_values():
    attention = torch.tensor([[0.3, 0.1, 0.2], [0.0, 0.5, 0.25]])
    curves = attention_loss_curves(attention)
    torch.testing.assert_close(curves, torch.tensor([[0.0, 0.1, 0.3, 0.6], [0.0, 0.0, 0.25, 0.75]], dtype=torch.float64))


def test_resample_is_linear_in_the_dropped_fraction():
    curves = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)  # V = 2
    torch.testing.assert_close(resample_curves(curves, 4), torch.tensor([[0.0, 0.5, 1.0, 2.0, 3.0]], dtype=torch.float64))
    acc = CurveAccumulator()
    acc.add(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]))
    acc.add(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))  # other V: resampled to 2
    self_curve, cross_curve = acc.curves()
    torch.testing.assert_close(self_curve, torch.tensor([[0.0, 1.5, 3.5]], dtype=torch.float64))
    torch.testing.assert_close(cross_curve, torch.tensor([[0.0, 1.0, 2.5]], dtype=torch.float64))


def _monotone_schedules(layers, visual):
    for tail in itertools.product(range(visual + 1), repeat=layers - 1):
        removed = (0, *tail)
        if all(a <= b for a, b in itertools.pairwise(removed)):
            yield removed


@settings(deadline=None, max_examples=60)
@given(
    layers=st.integers(2, 4),
    visual=st.integers(1, 4),
    text=st.integers(0, 5),
    reduction=st.floats(0.01, 0.6),
    seed=st.integers(0, 10_000),
)
def test_search_minimises_the_largest_loss_among_schedules_that_meet_the_budget(layers, visual, text, reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    self_curves = attention_loss_curves(torch.rand(layers, visual, generator=generator))
    cross_curves = attention_loss_curves(torch.rand(layers, visual, generator=generator))
    size = flops.DecoderSize(8, 16, layers)
    loss = torch.maximum(self_curves, cross_curves)
    limit = budget(_flops([text + visual] * layers, size), reduction)
    feasible = [r for r in _monotone_schedules(layers, visual) if _flops([text + visual - c for c in r], size) <= limit]
    if not feasible:
        with pytest.raises(ValueError, match="unreachable"):
            search_recipe(self_curves, cross_curves, size=size, text_tokens=text, reduction=reduction)
        return
    recipe = search_recipe(self_curves, cross_curves, size=size, text_tokens=text, reduction=reduction)
    worst = lambda r: max(float(loss[i, c]) for i, c in enumerate(r))  # noqa: E731
    best = min(worst(r) for r in feasible)
    assert recipe.removed in [tuple(r) for r in feasible]
    assert recipe.flops_pruned == _flops(recipe.tokens_per_layer, size) <= recipe.budget_flops == limit
    assert recipe.max_attention_loss == pytest.approx(best) and worst(recipe.removed) == pytest.approx(best)
    # ... and it removes every token that loss allows: it dominates every schedule as good
    for r in feasible:
        if worst(r) <= best:
            assert all(a <= b for a, b in zip(r, recipe.removed, strict=True))


def test_budget_reachable_and_recipe_fields():
    layers, visual, text = 6, 20, 8
    attention = torch.linspace(0.001, 0.05, visual).repeat(layers, 1)
    size = flops.DecoderSize(64, 128, layers)
    recipe = search_recipe(attention_loss_curves(attention), attention_loss_curves(attention * 0.5), size=size,
                           text_tokens=text, reduction=0.3)
    assert recipe.removed[0] == 0 and list(recipe.removed) == sorted(recipe.removed)
    assert recipe.flops_pruned <= budget(recipe.flops_unpruned, 0.3) and recipe.achieved_reduction >= 0.3
    assert recipe.kept == [visual - r for r in recipe.removed] and sum(recipe.drops) == recipe.removed[-1]
    assert recipe.first_layer == next(i for i, r in enumerate(recipe.removed) if r)
    with pytest.raises(ValueError, match=r"reduction=0.95: unreachable; removing every visual token from layer 1 on"):
        search_recipe(attention_loss_curves(attention), attention_loss_curves(attention), size=size, text_tokens=text,
                      reduction=0.95)
    with pytest.raises(ValueError, match=r"reduction=1.0"):
        search_recipe(attention_loss_curves(attention), attention_loss_curves(attention), size=size, text_tokens=text,
                      reduction=1.0)


def test_removed_for_other_token_counts():
    recipe = FitPruneRecipe(num_layers=4, hidden_size=8, intermediate_size=16, visual_tokens=10, text_tokens=3,
                            removed=(0, 3, 5, 10), reduction=0.2)
    assert recipe.removed_for(10) == [0, 3, 5, 10]
    assert recipe.removed_for(20) == [0, 6, 10, 20]
    assert recipe.removed_for(5) == [0, 2, 2, 5]  # round(1.5) = 2, round(2.5) = 2 (half to even)
    assert recipe.drops == [0, 3, 2, 5] and recipe.first_layer == 1


def test_file_round_trip_and_clear_errors(tmp_path):
    recipe = FitPruneRecipe(num_layers=3, hidden_size=8, intermediate_size=16, visual_tokens=4, text_tokens=2,
                            removed=(0, 1, 3), reduction=0.25, threshold=0.1, max_attention_loss=0.05,
                            calibration={"samples": 2})
    path = save_recipe(recipe, tmp_path / "r.json")
    loaded = load_recipe(path)
    assert loaded == recipe and loaded.source == str(path) and loaded.calibration == {"samples": 2}
    data = json.loads(path.read_text())
    assert data["drop_per_layer"] == [0, 1, 2] and data["kept_per_layer"] == [4, 3, 1]
    assert data["flops_pruned"] == _flops([6, 5, 3], recipe.size) and data["achieved_reduction"] == recipe.achieved_reduction

    with pytest.raises(FileNotFoundError, match=r"FITPRUNE_RECIPE='.*missing.json': no such file.*fitprune-calibrate"):
        load_recipe(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, match in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**data, "format": "x"}), "'format' is 'x'"),
        (json.dumps({k: v for k, v in data.items() if k != "visual_tokens"}), r"missing field\(s\) \['visual_tokens'\]"),
        (json.dumps({**data, "removed_per_layer": [0, 3, 1]}), "must be non-decreasing"),
        (json.dumps({**data, "removed_per_layer": [1, 2, 3]}), r"removed\[0\]=1: layer 0 must see every token"),
        (json.dumps({**data, "removed_per_layer": [0, 1]}), "2 counts for num_layers=3"),
        (json.dumps({**data, "removed_per_layer": [0, 1, 5]}), "more than visual_tokens=4"),
        (json.dumps({**data, "num_layers": "3"}), r"num_layers='3': must be an integer"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_recipe(bad)
    with pytest.raises(ValueError, match=r"computed for a model of 3 decoder layers, but this model has 4"):
        recipe.check_model(4)
    with pytest.raises(ValueError, match=r"computed for hidden_size=8, but this model has hidden_size=16"):
        recipe.check_model(3, 16, 16)


@pytest.mark.parametrize("opener, closer", [("[", "]"), ('{"a": ', "}")])
def test_deeply_nested_recipe_is_a_clear_error(tmp_path, opener, closer):
    path = tmp_path / "deep.json"
    path.write_text(opener * 100_000 + "0" + closer * 100_000)
    with pytest.raises(ValueError, match=r"FITPRUNE_RECIPE='.*deep.json': JSON nested too deeply"):
        load_recipe(path)
