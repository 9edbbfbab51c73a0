"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models", ECCV 2024).

At layer L (`LAYER_INDEX`, default 2) each image keeps its K = int(round(SUBSET_RATIO x V)) visual
tokens that receive the most attention in layer L-1 from the last token of the prompt, averaged
over heads. Only that one attention row is computed (`head_mean_attention` on layer L-1's input);
the model keeps its sdpa / flash attention.
"""

from __future__ import annotations

from torch import Tensor

from llava.model.in_llm.attention import head_mean_attention
from llava.model.in_llm.methods import top_k


def fastv_scores(ctx) -> Tensor:
    """(I, V_max) attention each image token receives from its sample's last token in layer L-1."""
    hidden, cos, sin = ctx.previous
    last = ctx.last_rows().to(hidden.device)[:, None]  # (B, 1)
    probs = head_mean_attention(ctx.layers[ctx.layer - 1], hidden, cos, sin, last, ctx.valid)[:, 0]  # (B, N)
    return ctx.image_values(probs)


def fastv_keep(ctx) -> Tensor:
    """(I, K_max) kept indices per image, ascending, -1 padded."""
    return top_k(fastv_scores(ctx), ctx.lengths, ctx.keep)
