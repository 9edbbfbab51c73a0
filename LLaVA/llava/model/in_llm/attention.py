"""Attention probabilities of a few query rows of one decoder layer, computed on the side.

The model runs with sdpa (or flash-attention), which never materialises attention weights.
FastV and FitPrune need some of them (`otprune.methods.fastv`, `otprune.methods.fitprune`): this recomputes exactly the rows they need from the layer's
input hidden states with the layer's own weights -- `input_layernorm`, `q_proj` on the query rows
only, `k_proj` on every row, rotary embeddings, grouped-query heads repeated -- then a causal,
padding-masked softmax over all keys in fp32, averaged over heads. The rest of the model keeps
its fast attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

# Largest number of attention scores (batch x heads x queries x keys) formed at once.
CHUNK_ELEMENTS = 1 << 25


def rotated_keys(layer: nn.Module, normed: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The keys `layer` attends with: normed (B, N, D) its input after `input_layernorm`, cos / sin
    (B or 1, N, hd) -> (B, Hkv, N, hd) fp32, k_proj then the rotary embedding (heads not repeated)."""
    attn = layer.self_attn
    bsz, n, _ = normed.shape
    keys = attn.k_proj(normed).view(bsz, n, -1, attn.head_dim).transpose(1, 2).float()
    _, keys = apply_rotary_pos_emb(keys, keys, cos.expand(bsz, -1, -1).float(), sin.expand(bsz, -1, -1).float())
    return keys


def head_mean_attention(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, query_rows: Tensor, valid: Tensor) -> Tensor:
    """Softmax attention of `query_rows` over all keys in `layer`, averaged over heads.

    Args:
        layer: a Llama decoder layer (`input_layernorm`, `self_attn.{q,k}_proj`, ...).
        hidden: (B, N, D) the layer's input hidden states.
        cos, sin: (B or 1, N, head_dim) rotary embeddings of the N rows.
        query_rows: (B, Q) long, rows of `hidden` whose attention is wanted (each must be valid).
        valid: (B, N) bool, False at padding rows (never attended).

    Returns:
        (B, Q, N) fp32: row q is the head-averaged attention of query_rows[b, q] over the keys;
        key j is attended iff valid[b, j] and j <= query_rows[b, q] (causal in row order).
    """
    attn = layer.self_attn
    bsz, n, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)  # (B, N, D)
    cos = cos.expand(bsz, -1, -1)
    sin = sin.expand(bsz, -1, -1)
    keys = repeat_kv(rotated_keys(layer, x, cos, sin), attn.num_key_value_groups)  # (B, H, N, hd)
    heads = keys.shape[1]
    q_total = query_rows.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, bsz * heads * n))
    key_index = torch.arange(n, device=hidden.device)
    out = []
    for start in range(0, q_total, chunk):
        rows = query_rows[:, start : start + chunk]  # (B, C)
        xq = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, C, D)
        queries = attn.q_proj(xq).view(bsz, rows.shape[1], -1, head_dim).transpose(1, 2).float()  # (B, H, C, hd)
        gather = rows[..., None].expand(-1, -1, head_dim)
        queries, _ = apply_rotary_pos_emb(queries, queries, cos.float().gather(1, gather), sin.float().gather(1, gather))
        scores = torch.matmul(queries, keys.transpose(2, 3)) * attn.scaling  # (B, H, C, N)
        allowed = valid[:, None, :] & (key_index[None, None, :] <= rows[:, :, None])  # (B, C, N)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out.append(scores.softmax(dim=-1).mean(dim=1))  # (B, C, N)
    return torch.cat(out, dim=1)


def received_attention(layer, hidden: Tensor, cos: Tensor, sin: Tensor, valid: Tensor, layout, images: list[list[int]],
                       rows: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """Self and cross attention received by each image token in `layer`: two (I, V_max) fp32 tensors.

    Args:
        layer: the decoder layer; hidden (B, N, D), cos/sin (B, N, hd), valid (B, N): its input.
        layout: a `HostLayout` of the rows; images: per sample, its image indices in prompt order.
        rows: (I, V_max) current rows of each image's tokens; sample: (I,) sample of each image.
    """
    device = hidden.device
    bsz, n = valid.shape
    per_sample = max((len(spans) for spans in layout.spans), default=0)
    n_images = rows.shape[0]
    if per_sample == 0:
        zeros = torch.zeros(n_images, rows.shape[1], device=device)
        return zeros, zeros
    text = layout.valid()  # (B, N) host
    for b, spans in enumerate(layout.spans):
        for start, end in spans:
            text[b, start:end] = False
    index = torch.arange(n)
    w_self = torch.zeros(bsz, n, per_sample)
    w_cross = torch.zeros(bsz, n, per_sample)
    local = [0] * n_images
    for b, spans in enumerate(layout.spans):
        for j, ((start, end), i) in enumerate(zip(spans, images[b], strict=True)):
            local[i] = j
            if end > start:
                w_self[b, start:end, j] = 1.0 / (end - start)
            after = text[b] & (index >= end)
            count = int(after.sum())
            if count:
                w_cross[b, after, j] = 1.0 / count
    used = (w_self + w_cross).sum(dim=2) > 0  # (B, N) query rows that matter
    q_rows = [used[b].nonzero().squeeze(1) for b in range(bsz)]
    q_max = max(max(r.numel() for r in q_rows), 1)
    last = [layout.seq_len - 1 if layout.side == "left" else m - 1 for m in layout.seq_lens]
    query = torch.stack([torch.cat([r, torch.full((q_max - r.numel(),), last[b])]) for b, r in enumerate(q_rows)])
    real = torch.arange(q_max)[None] < torch.tensor([r.numel() for r in q_rows])[:, None]  # (B, Q)
    gather = query[..., None].expand(-1, -1, per_sample)
    wq_self = (w_self.gather(1, gather) * real[..., None]).to(device)  # (B, Q, J)
    wq_cross = (w_cross.gather(1, gather) * real[..., None]).to(device)
    probs = head_mean_attention(layer, hidden, cos, sin, query.to(device), valid)  # (B, Q, N)
    m_self = torch.einsum("bqn,bqj->bjn", probs, wq_self)  # (B, J, N)
    m_cross = torch.einsum("bqn,bqj->bjn", probs, wq_cross)
    local_t = torch.tensor(local, device=device)
    pick = (sample[:, None], local_t[:, None], rows)
    return m_self[pick], m_cross[pick]
