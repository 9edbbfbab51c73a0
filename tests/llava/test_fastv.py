"""FastV: keep the visual tokens with the most attention from the last token in layer L-1."""

from __future__ import annotations

import pytest
import torch
from inllm_utils import eager_attention, single
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids

from otprune import PruneConfig

# Tiny matrices: one thread is faster and immune to other processes on the cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
@pytest.mark.parametrize("layer, ratio", [(1, 0.25), (2, 0.5), (3, 0.125)])
def test_kept_set_is_top_k_of_an_explicit_attention(tiny_deep, layer, ratio):
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep, seed=layer)
    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], images=px, output_hidden_states=True)
    (start, end), = model.visual_layout.spans[0]
    attention = eager_attention(model, layer - 1, ref.hidden_states[layer - 1][0])  # (N, N), GQA model
    received = attention[-1, start:end]  # from the last token
    k = round(ratio * (end - start))
    expected = received.topk(k).indices.sort().values
    assert received.sort(descending=True).values[k - 1] > received.sort(descending=True).values[k]  # no tie at the cut
    model.set_pruning(PruneConfig(method="fastv", layer=layer, ratio=ratio))
    out = model(input_ids=ids[None], images=px)
    n = ref.logits.shape[1]
    rows = torch.cat([torch.arange(start), expected + start, torch.arange(end, n)])
    assert torch.equal(model.pruned_layout.stages[-1].source[0], rows)
    assert out.logits.shape[1] == n and int(model.pruned_layout.output_rows().sum()) == n - (end - start) + k
    assert model.config._attn_implementation == "sdpa"  # the model was never switched to eager


@torch.no_grad()
def test_each_sample_ranks_with_its_own_last_token(tiny_deep):
    model = tiny_deep.model
    seqs = [token_ids(tiny_deep.tokenizer, chat_prompt(q)) for q in ("Describe the image.", "What color is the object?")]
    images = [noise_image(31), noise_image(32, (50, 20))]
    ids, mask = pad_batch(seqs, "left", 0)
    model.set_pruning(PruneConfig(method="fastv", layer=2, ratio=0.25))
    model(input_ids=ids, attention_mask=mask, images=pixels(tiny_deep, images))
    final = model.pruned_layout.stages[-1]
    batch_rows = [final.source[b][final.valid[b]] for b in range(2)]  # rows of the padded batch
    spans = model.visual_layout.spans
    for b in range(2):
        model(input_ids=seqs[b][None], images=pixels(tiny_deep, [images[b]]))
        alone = model.pruned_layout.stages[-1].source[0]
        (start, _), = spans[b]
        (start_alone, _), = model.visual_layout.spans[0]
        assert torch.equal(batch_rows[b] - (start - start_alone), alone), b  # minus sample b's padding


def test_default_layer_is_two_and_layer_zero_is_refused(tiny_deep, monkeypatch):
    monkeypatch.setenv("BASELINE", "FASTV")
    monkeypatch.setenv("SUBSET_RATIO", "0.5")
    config = PruneConfig.from_env()
    assert (config.method, config.layer, config.ratio) == ("fastv", 2, 0.5)
    model = tiny_deep.model
    ids, px, sizes = single(tiny_deep)
    with torch.no_grad():
        model(input_ids=ids[None], images=px)
    stats = model.pruning_stats[0]
    v, n = stats["visual_tokens_before"], stats["seq_len_before"]
    assert (stats["method"], stats["layer"], stats["ratio"]) == ("fastv", 2, 0.5)
    assert stats["tokens_per_layer"] == [n, n, n - v // 2, n - v // 2]
    monkeypatch.setenv("LAYER_INDEX", "0")
    with pytest.raises(ValueError, match=r"layer=0 \(LAYER_INDEX\): FASTV ranks .* layer L-1.*>= 1"):
        PruneConfig.from_env()
    monkeypatch.delenv("SUBSET_RATIO")
    monkeypatch.delenv("LAYER_INDEX")
    with pytest.raises(ValueError, match=r"SUBSET_RATIO: not set, but BASELINE='FASTV'"):
        PruneConfig.from_env()
