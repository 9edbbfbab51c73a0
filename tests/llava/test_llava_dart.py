"""DART in our llava (inside the LLM, like FastV): the kept set against the numpy oracle fed with keys
and normed hidden states written from the Llama equations (not the model's code paths)."""

from __future__ import annotations

import pytest
import torch
from inllm_utils import assert_batch_rows_equal_alone, rms_norm, rope_theta, rotate, single
from llava_test_utils import noise_image
from oracles_baselines import dart_oracle

from otprune import PruneConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _keys(model, layer_index, hidden):
    """(N, C) keys of layer `layer_index` for ONE unpadded sequence (its input hidden (N, D)), heads concatenated."""
    config = model.config
    layer = model.get_model().layers[layer_index]
    kv_heads, hd = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    n = hidden.shape[0]
    x = rms_norm(hidden.float(), layer.input_layernorm.weight.float(), config.rms_norm_eps)
    k = (x @ layer.self_attn.k_proj.weight.float().T).view(n, kv_heads, hd).transpose(0, 1)
    return rotate(k, torch.arange(n), rope_theta(config)).transpose(0, 1).reshape(n, -1)


@torch.no_grad()
@pytest.mark.parametrize("layer, ratio, pivots", [(2, 0.5, (4, 4)), (1, 0.25, (2, 3)), (3, 0.75, (4, 4))])
def test_kept_set_matches_the_oracle(tiny_deep, layer, ratio, pivots):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=layer)
    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], images=px, output_hidden_states=True)
    (start, end), = model.visual_layout.spans[0]
    n = ref.logits.shape[1]
    keys = _keys(model, layer - 1, ref.hidden_states[layer - 1][0]).double().numpy()
    norm = model.get_model().norm
    states = rms_norm(ref.hidden_states[layer][0].float(), norm.weight.float(), model.config.rms_norm_eps).double().numpy()
    v = end - start
    want = dart_oracle(keys[start:end], states[start:end], keys[end:], states[end:], round(ratio * v), *pivots, start)
    model.set_pruning(PruneConfig(method="dart", layer=layer, ratio=ratio, pivots_image=pivots[0], pivots_text=pivots[1]))
    out = model(input_ids=ids[None], images=px)
    rows = torch.cat([torch.arange(start), torch.tensor(want) + start, torch.arange(end, n)])
    assert torch.equal(model.pruned_layout.stages[-1].source[0], rows)
    assert out.logits.shape[1] == n
    assert model.pruning_stats[0]["image_tokens_after"] == [len(want)]
    per_layer = model.pruning_stats[0]["visual_tokens_per_layer"]
    assert per_layer == [v] * layer + [len(want)] * (model.config.num_hidden_layers - layer)


def test_batch_equals_alone(tiny_deep):
    assert_batch_rows_equal_alone(tiny_deep.model, tiny_deep, PruneConfig(method="dart", layer=2, ratio=0.5),
                                  ("Describe the image.", "What color is the object here?"),
                                  [noise_image(41), noise_image(42, (50, 20))])


@torch.no_grad()
def test_generate_runs_and_default_layer(tiny_deep, monkeypatch):
    monkeypatch.setenv("BASELINE", "DART")
    monkeypatch.setenv("SUBSET_RATIO", "0.5")
    assert PruneConfig.from_env().layer == 2
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=7)
    out = model.generate(ids[None], images=px, image_sizes=sizes, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] >= 1
