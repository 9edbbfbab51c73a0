"""DART in our llava (inside the LLM, like FastV): the kept set against the numpy oracle fed with keys
and normed hidden states written from the Llama equations (not the model's code paths)."""

from __future__ import annotations

import pytest
import torch
from inllm_utils import assert_batch_rows_equal_alone, dart_reference, single
from llava_test_utils import noise_image

from otprune import PruneConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
@pytest.mark.parametrize("layer, ratio, pivots", [(2, 0.5, (4, 4)), (1, 0.25, (2, 3)), (3, 0.75, (4, 4))])
def test_kept_set_matches_the_oracle(tiny_deep, layer, ratio, pivots):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=layer)
    want, (start, end) = dart_reference(model, ids, px, None, layer, ratio, pivots)
    n = ids.numel() - 1 + (end - start)  # the placeholder replaced by the image's tokens
    v = end - start
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
