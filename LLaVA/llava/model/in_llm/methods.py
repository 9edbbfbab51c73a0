"""Dispatch a stage of in-LLM pruning to its rule, and the shared top-K helper."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_tokens(ctx) -> Tensor:
    """(I, K_max) indices of the tokens each image keeps at this stage, ascending, -1 padded.

    `ctx` is a `llava.model.in_llm.decoder.StageContext`.
    """
    method = ctx.config.method
    if method == "fastv":
        from llava.model.in_llm.fastv import fastv_keep

        return fastv_keep(ctx)
    if method == "vtw":
        from llava.model.in_llm.vtw import vtw_keep

        return vtw_keep(ctx)
    if method == "fitprune":
        from llava.model.in_llm.fitprune import fitprune_keep

        return fitprune_keep(ctx)
    from llava.model.in_llm.feature import feature_keep

    return feature_keep(ctx)


def top_k(scores: Tensor, lengths: list[int], keep: list[int]) -> Tensor:
    """Per row, the `keep[i]` highest of its first `lengths[i]` scores: (I, V_max) -> (I, K_max).

    Indices ascending, -1 in the slots beyond keep[i]; ties go to the lower index.
    """
    n_images, v_max = scores.shape
    k_max = max(keep, default=0)
    if k_max == 0:
        return torch.empty(n_images, 0, dtype=torch.long, device=scores.device)
    device = scores.device
    real = torch.arange(v_max, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    scores = scores.float().masked_fill(~real, float("-inf"))
    # stable descending order: ties keep the lower index first
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k_max]
    slot = torch.arange(k_max, device=device)[None]
    order = order.masked_fill(slot >= torch.tensor(keep, device=device)[:, None], v_max)
    order = order.sort(dim=1).values
    return order.masked_fill(order >= v_max, -1)
