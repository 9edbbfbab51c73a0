"""The environment switches as a user sets them: no silently unpruned run, one log line."""

from __future__ import annotations

import pytest
import torch
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids

import otprune
from otprune.methods.otprune import official_order


@torch.no_grad()
def _forward(tiny):
    image = noise_image(3, (40, 30))
    ids = token_ids(tiny.tokenizer, chat_prompt("What is shown?"))
    tiny.model(input_ids=ids[None], images=pixels(tiny, [image]), image_sizes=[image.size])
    return tiny.model.pruning_stats[0], ids.numel() - 1


@pytest.mark.parametrize("switches", [{"BASELINE": "OURS", "SUBSET_RATIO": "0.25"}, {"SUBSET_RATIO": "0.25"}])
def test_pruning_without_layer_index_prunes_at_layer_0(tiny_v15, monkeypatch, switches):
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    stats, text = _forward(tiny_v15)
    assert (stats["method"], stats["layer"], stats["ratio"]) == ("otprune", 0, 0.25)
    assert (stats["visual_tokens_before"], stats["visual_tokens_after"]) == (16, 4)
    assert stats["seq_len_after"] == text + 4


def test_baseline_alone_stops_with_an_error_naming_subset_ratio(tiny_v15, monkeypatch):
    monkeypatch.setenv("BASELINE", "DIVPRUNE")
    with pytest.raises(ValueError, match=r"SUBSET_RATIO: not set, but BASELINE='DIVPRUNE' asks for pruning"):
        _forward(tiny_v15)


def test_the_model_logs_once_what_is_active(tiny_v15, monkeypatch, caplog):
    tiny_v15.model._otprune_announced = None
    with caplog.at_level("INFO", logger="otprune"):
        _forward(tiny_v15)
        _forward(tiny_v15)
        monkeypatch.setenv("BASELINE", "OURS")
        monkeypatch.setenv("LAYER_INDEX", "0")
        monkeypatch.setenv("SUBSET_RATIO", "0.098")
        _forward(tiny_v15)
        _forward(tiny_v15)
    lines = [r.getMessage() for r in caplog.records if r.name == "otprune"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("LlavaLlamaForCausalLM: pruning off")
    assert lines[1].startswith("LlavaLlamaForCausalLM: pruning on: OTPrune before the LLM (layer 0), keeping 0.098")


@pytest.mark.parametrize("method", ["DIVPRUNE", "OURS"])
@torch.no_grad()
def test_official_order_per_method(tiny_v15, monkeypatch, method):
    """OTPRUNE_ORDER=official: DivPrune's code keeps its tokens ascending; OTPrune's in set order."""
    for name, value in {"BASELINE": method, "LAYER_INDEX": "0", "SUBSET_RATIO": "0.5", "OTPRUNE_ORDER": "official"}.items():
        monkeypatch.setenv(name, value)
    stats, _ = _forward(tiny_v15)  # noise_image(3)
    features = tiny_v15.model.encode_images(pixels(tiny_v15, [noise_image(3, (40, 30))]))[0]
    picks = otprune.select_tokens(features, 0.5, method, order="greedy").tolist()
    expected = official_order(picks) if method == "OURS" else sorted(picks)
    assert tiny_v15.model.visual_layout.kept_indices[0].tolist() == expected
    assert stats["order"] == "official"
