"""Oracles for pruning inside the LLM, written from the Llama equations (not the model's code paths)."""

from __future__ import annotations

import torch
from llava_test_utils import chat_prompt, noise_image, pixels, token_ids
from torch import Tensor


def rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding of x: (H, N, hd) at positions (N,)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[:, None] * inv[None]  # (N, hd/2)
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    half = hd // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def layer_keys(model, layer_index: int, hidden: Tensor) -> Tensor:
    """(N, C) keys of layer `layer_index` for ONE unpadded sequence (its input hidden (N, D)), heads
    concatenated, after the rotary embedding at positions 0..N-1."""
    config = model.config
    layer = model.get_model().layers[layer_index]
    kv_heads, hd = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    n = hidden.shape[0]
    x = rms_norm(hidden.float(), layer.input_layernorm.weight.float(), config.rms_norm_eps)
    k = (x @ layer.self_attn.k_proj.weight.float().T).view(n, kv_heads, hd).transpose(0, 1)
    return rotate(k, torch.arange(n), rope_theta(config)).transpose(0, 1).reshape(n, -1)


@torch.no_grad()
def dart_reference(model, ids: Tensor, px, sizes, layer: int, ratio: float, pivots=(4, 4)) -> tuple[list[int], tuple]:
    """DART's kept tokens of the ONE image of prompt `ids` (within the image, ascending) by the numpy
    oracle (`oracles_baselines.dart_oracle`), fed with keys and normed hidden states written from the
    Llama equations on the unpruned forward; also the image's (start, end) in the sequence."""
    from oracles_baselines import dart_oracle

    from otprune import PruneConfig

    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], images=px, image_sizes=sizes, output_hidden_states=True)
    (start, end), = model.visual_layout.spans[0]
    keys = layer_keys(model, layer - 1, ref.hidden_states[layer - 1][0]).double().numpy()
    norm = model.get_model().norm
    states = rms_norm(ref.hidden_states[layer][0].float(), norm.weight.float(), model.config.rms_norm_eps).double().numpy()
    v = end - start
    want = dart_oracle(keys[start:end], states[start:end], keys[end:], states[end:], round(ratio * v), *pivots, start)
    return sorted(int(i) for i in want), (start, end)


def eager_attention(model, layer_index: int, hidden: Tensor, positions: Tensor | None = None) -> Tensor:
    """Head-averaged softmax(Q K^T / sqrt(hd)) with a causal mask: (N, N), for ONE unpadded sequence.

    hidden: (N, D) the layer's input; positions (N,) default 0..N-1.
    """
    config = model.config
    layer = model.get_model().layers[layer_index]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    n = hidden.shape[0]
    positions = torch.arange(n) if positions is None else positions
    x = rms_norm(hidden.float(), layer.input_layernorm.weight.float(), config.rms_norm_eps)
    q = (x @ layer.self_attn.q_proj.weight.float().T).view(n, heads, hd).transpose(0, 1)
    k = (x @ layer.self_attn.k_proj.weight.float().T).view(n, kv_heads, hd).transpose(0, 1)
    q, k = rotate(q, positions, rope_theta(config)), rotate(k, positions, rope_theta(config))
    k = k.repeat_interleave(heads // kv_heads, dim=0)  # (H, N, hd)
    scores = q @ k.transpose(1, 2) / hd**0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(0)


def single(tiny, seed: int = 1, size=(40, 30), question: str = "Describe the image."):
    image = noise_image(seed, size)
    ids = token_ids(tiny.tokenizer, chat_prompt(question))
    return ids, pixels(tiny, [image]), [image.size]


@torch.no_grad()
def greedy_without_cache(model, ids: Tensor, px, sizes, steps: int) -> list[int]:
    """Greedy decoding that re-runs the whole multimodal forward for every new token (no KV cache)."""
    seq = ids.clone()
    out = []
    for _ in range(steps):
        logits = model(input_ids=seq[None], images=px, image_sizes=sizes, use_cache=False).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        seq = torch.cat([seq, torch.tensor([token])])
    return out


@torch.no_grad()
def assert_batch_rows_equal_alone(model, tiny, config, questions, images) -> None:
    """Prune a left-padded batch with `config`; each sample's kept rows (the last stage's) equal its
    rows when run alone, shifted by its padding."""
    from llava_test_utils import pad_batch

    seqs = [token_ids(tiny.tokenizer, chat_prompt(q)) for q in questions]
    ids, mask = pad_batch(seqs, "left", 0)
    model.set_pruning(config)
    model(input_ids=ids, attention_mask=mask, images=pixels(tiny, images))
    final = model.pruned_layout.stages[-1]
    batch_rows = [final.source[b][final.valid[b]] for b in range(len(seqs))]  # rows of the padded batch
    spans = model.visual_layout.spans
    for b in range(len(seqs)):
        model(input_ids=seqs[b][None], images=pixels(tiny, [images[b]]))
        alone = model.pruned_layout.stages[-1].source[0]
        (start, _), = spans[b]
        (start_alone, _), = model.visual_layout.spans[0]
        assert torch.equal(batch_rows[b] - (start - start_alone), alone), b  # minus sample b's padding
