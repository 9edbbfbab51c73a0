"""Issue #16 point 1 in our llava: every pruned image's stats carry the distance of its kept
tokens to all its tokens on the features the selection saw, for every selection method at
layer 0 and at a decoder layer, None where undefined (VTW); timed apart from select / prefill."""

from __future__ import annotations

import pytest
import torch
from inllm_utils import single
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids

import otprune
from otprune import PruneConfig
from otprune.distance import eq4_distance

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
@pytest.mark.parametrize("method", ["otprune", "divprune", "dpp", "random", "uniform", "first_k", "last_k"])
def test_layer_zero_every_method_records_eq4_on_the_projected_features(tiny_v15, method):
    model = tiny_v15.model
    images = [noise_image(3, (40, 30)), noise_image(4, (30, 40))]
    ids = token_ids(tiny_v15.tokenizer, chat_prompt("Compare.", n_images=2))
    px = pixels(tiny_v15, images)
    model.set_pruning(PruneConfig(method=method, layer=0, ratio=0.25))
    model(input_ids=ids[None], images=px)
    (stats,) = model.pruning_stats
    feats = model.encode_images(px)  # (2, 16, D): what the selection saw
    expected = [eq4_distance(feats[i], otprune.select_tokens(feats[i], 0.25, method)) for i in range(2)]
    assert stats["distance_kind"] == "eq4" and len(stats["distance"]) == 2
    assert stats["distance"] == pytest.approx([e[0] for e in expected], rel=1e-6)
    assert stats["objective"] == pytest.approx([e[1] for e in expected], rel=1e-6)
    assert stats["distance_ms"] >= 0


@torch.no_grad()
def test_off_unpruned_and_distance_is_not_in_prefill_ms(tiny_v15, monkeypatch):
    model = tiny_v15.model
    ids, px, sizes = single(tiny_v15)
    model.set_pruning(PruneConfig())
    model(input_ids=ids[None], images=px)
    assert model.pruning_stats[0]["distance"] is None  # unpruned: nothing to measure
    model.set_pruning(PruneConfig(layer=0, ratio=0.25))
    monkeypatch.setenv("OTPRUNE_DISTANCE", "off")
    model(input_ids=ids[None], images=px)
    assert model.pruning_stats[0]["distance"] is None and model.pruning_stats[0]["distance_kind"] is None
    monkeypatch.setenv("OTPRUNE_DISTANCE", "exact")
    with pytest.raises(ValueError, match="OTPRUNE_DISTANCE='exact': must be one of off, eq4, gaussian, w2"):
        model(input_ids=ids[None], images=px)
    monkeypatch.delenv("OTPRUNE_DISTANCE")
    # the distance runs after the prefill's clock stopped (and the selection's), on its own clock
    from llava.model import llava_arch

    real, seen = llava_arch.kept_distances, []

    def spy(*args, **kwargs):
        seen.append(getattr(model, "_active_clock", None))
        return real(*args, **kwargs)

    monkeypatch.setattr(llava_arch, "kept_distances", spy)
    model(input_ids=ids[None], images=px)
    assert seen == [None] and model.pruning_stats[0]["distance"] is not None


@torch.no_grad()
def test_w2_switch_records_the_exact_distance(tiny_v15, monkeypatch):
    pytest.importorskip("ot")
    from otprune.analysis.distances import wasserstein2

    model = tiny_v15.model
    ids, px, sizes = single(tiny_v15)
    model.set_pruning(PruneConfig(method="divprune", layer=0, ratio=0.25))
    monkeypatch.setenv("OTPRUNE_DISTANCE", "w2")
    model(input_ids=ids[None], images=px)
    stats = model.pruning_stats[0]
    feats = model.encode_images(px)[0]
    keep = otprune.select_tokens(feats, 0.25, "divprune")
    assert stats["distance_kind"] == "w2"
    assert stats["distance"][0] == pytest.approx(wasserstein2(feats, keep), rel=1e-5)
    assert stats["objective"][0] == pytest.approx(eq4_distance(feats, keep)[1], rel=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("method", ["otprune", "fastv"])
def test_in_llm_stage_records_the_distance_on_the_layer_input(tiny_deep, method):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], images=px, image_sizes=sizes, output_hidden_states=True)
    (start, end), = model.visual_layout.spans[0]
    layer = 2
    model.set_pruning(PruneConfig(method=method, layer=layer, ratio=0.25))
    model(input_ids=ids[None], images=px, image_sizes=sizes)
    stage = model.pruned_layout.stages[-1]
    kept_rows = stage.source[0]
    kept = kept_rows[(kept_rows >= start) & (kept_rows < end)] - start
    expected = eq4_distance(ref.hidden_states[layer][0, start:end], kept)
    stats = model.pruning_stats[0]
    assert stats["distance"] == pytest.approx([expected[0]], rel=1e-4)
    model.set_pruning(PruneConfig(method="vtw", layer=layer))
    model(input_ids=ids[None], images=px, image_sizes=sizes)
    assert model.pruning_stats[0]["distance"] == [None]  # nothing kept: undefined
