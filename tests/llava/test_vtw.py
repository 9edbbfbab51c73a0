"""VTW: every visual token is withdrawn at layer L."""

from __future__ import annotations

import pytest
import torch
from inllm_utils import single
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids

from otprune import PruneConfig

# Tiny matrices: one thread is faster and immune to other processes on the cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_no_visual_token_from_layer_l_on(tiny_deep, layer, monkeypatch):
    monkeypatch.setenv("BASELINE", "VTW")
    monkeypatch.setenv("LAYER_INDEX", str(layer))
    monkeypatch.setenv("SUBSET_RATIO", "0.5")  # not used by VTW
    model = tiny_deep.model
    prompt = chat_prompt("Compare the two images.", n_images=2, before="First: ")
    ids = token_ids(tiny_deep.tokenizer, prompt)
    px = pixels(tiny_deep, [noise_image(41), noise_image(42, (30, 60))])
    out = model(input_ids=ids[None], images=px, output_hidden_states=True)
    text = int((ids >= 0).sum())
    n = text + 2 * 16
    assert [h.shape[1] for h in out.hidden_states] == [n] * (layer + 1) + [text] * (4 - layer)
    visual = model.visual_layout.visual_mask()[0]
    source = model.pruned_layout.stages[-1].source[0]
    assert not visual[source].any() and torch.equal(source, (~visual).nonzero().squeeze(1))
    stats = model.pruning_stats[0]
    assert (stats["method"], stats["layer"], stats["ratio"]) == ("vtw", layer, None)
    assert stats["visual_tokens_per_layer"] == [32] * layer + [0] * (4 - layer)
    assert stats["tokens_per_layer"] == [n] * layer + [text] * (4 - layer)
    assert stats["image_tokens_after"] == [0, 0] and stats["seq_len_after"] == text


@torch.no_grad()
def test_generation_runs_on_text_only_caches(tiny_deep):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=43)
    model.set_pruning(PruneConfig(method="vtw", layer=2))
    out = model.generate(ids[None], images=px, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    text = int((ids >= 0).sum())
    # layers < 2 cache the whole prompt, layers >= 2 only the text; plus the 3 decoded tokens fed back
    assert [cache.layers[i].keys.shape[-2] for i in range(4)] == [text + 16 + 3] * 2 + [text + 3] * 2


def test_vtw_needs_a_layer():
    with pytest.raises(ValueError, match=r"LAYER_INDEX: not set; VTW needs the layer"):
        PruneConfig.from_env({"BASELINE": "VTW"})
    with pytest.raises(ValueError, match=r"layer=0 \(LAYER_INDEX\): VTW"):
        PruneConfig.from_env({"BASELINE": "vtw", "LAYER_INDEX": "0"})
    config = PruneConfig.from_env({"BASELINE": "VTW", "LAYER_INDEX": "5", "SUBSET_RATIO": "0.3"})
    assert (config.method, config.layer, config.ratio, config.in_llm) == ("vtw", 5, None, True)
