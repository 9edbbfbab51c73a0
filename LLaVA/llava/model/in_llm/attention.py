"""Attention probabilities of a few query rows of one decoder layer, computed on the side.

The model runs with sdpa (or flash-attention), which never materialises attention weights.
FastV and FitPrune need some of them: this recomputes exactly the rows they need from the layer's
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
    keys = attn.k_proj(x).view(bsz, n, -1, head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
    cos = cos.expand(bsz, -1, -1)
    sin = sin.expand(bsz, -1, -1)
    keys = keys.float()
    _, keys = apply_rotary_pos_emb(keys, keys, cos.float(), sin.float())
    keys = repeat_kv(keys, attn.num_key_value_groups)  # (B, H, N, hd)
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
