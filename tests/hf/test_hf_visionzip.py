"""VisionZip through `otprune.hf` on transformers' own LLaVA-1.5 (`Llava`) and LLaVA-1.6 (`LlavaNext`):
per crop, the numpy oracle on q / k computed by hand (fp64) from the weights of the tower layer
producing the selected hidden state; the merged rows through the model's projector, the sequence
spliced by hand, the logits compared. CDPruner is refused clearly; towers without CLS refuse VisionZip."""

from __future__ import annotations

import pytest
import torch
from oracles_baselines import visionzip_oracle
from test_hf_prumerge import _crops, _layers, spliced
from test_llava_families import SAMPLES, assert_valid_close, logits, make_inputs, reference_logits

from otprune import PruneConfig, hf
from otprune.methods.prumerge import NoClsTokenError
from otprune.methods.visionzip import split_budget

pytestmark = pytest.mark.usefixtures("one_thread")
RATIO = 0.5


def oracle(tiny, inputs):
    """Per image, (its tokens after the projector, its rows' sources: crop j's patch i is j * N + i, CLS -3)."""
    px, counts = _crops(tiny, inputs)
    tower, select = tiny.model.model.vision_tower, tiny.model.config.vision_feature_layer
    layers = _layers(tower)
    heads = tower.config.num_attention_heads
    with torch.no_grad():
        states = tower(px, output_hidden_states=True).hidden_states
        index = select % (len(layers) + 1) - 1  # the layer producing hidden state `select`
        layer = layers[index]
        h = layer.layer_norm1(states[index]).double()
        q = h[:, 0] @ layer.self_attn.q_proj.weight.double().T + layer.self_attn.q_proj.bias.double()
        k = h @ layer.self_attn.k_proj.weight.double().T + layer.self_attn.k_proj.bias.double()
        hidden = states[select].double()
    n = hidden.shape[1] - 1
    dominant, ctx = split_budget(max(2, round(RATIO * n)), 10 / 64)
    projector = tiny.model.model.multi_modal_projector
    out, start = [], 0
    for p in counts:
        tokens, sources = [], []
        for j, c in enumerate(range(start, start + p)):
            rows, src = visionzip_oracle(hidden[c].numpy(), q[c].numpy(), k[c].numpy(), heads, dominant, ctx)
            with torch.no_grad():
                tokens.append(projector(torch.from_numpy(rows).float()))
            sources += [s if s < 0 else j * n + s for s in src]
        out.append((torch.cat(tokens), sources))
        start += p
    return out


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_visionzip_matches_the_oracle(_hf_models, family):
    tiny = _hf_models(family)
    inputs = make_inputs(tiny, SAMPLES)  # one image, two images, text only (left-padded)
    want = oracle(tiny, inputs)
    adapter = hf.apply(tiny.model, PruneConfig(method="visionzip", layer=0, ratio=RATIO))
    try:
        actual = logits(tiny, inputs)
        embeds, attention, positions = spliced(tiny, inputs, [w[0] for w in want])
        assert_valid_close(actual, reference_logits(tiny, embeds, attention, positions), attention)
        assert [s.tolist() for s in adapter.last_sources] == [w[1] for w in want]
    finally:
        adapter.remove()


def test_refusals(_hf_models):
    tiny = _hf_models("llava")
    with pytest.raises(ValueError, match="CDPRUNER.*CLIP text"):  # LLaVA-1.5 / 1.6 run it: tests/hf/test_hf_cdpruner.py
        hf.apply(_hf_models("onevision").model, PruneConfig(method="cdpruner", layer=0, ratio=0.25))
    with pytest.raises(ValueError, match="DART: prunes inside the LLM"):
        hf.apply(tiny.model, PruneConfig(method="dart", ratio=0.25))
    qwen = _hf_models("qwen2_5_vl")
    with pytest.raises(NoClsTokenError, match="VISIONZIP"):
        hf.apply(qwen.model, PruneConfig(method="visionzip", layer=0, ratio=0.25))
