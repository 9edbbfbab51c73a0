"""Last-K: keep the last k tokens (the bottom rows of the patch grid).

Reference: the last-K baseline of the OTPrune paper (Sec. 3.2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.base import TokenSelector, mask_beyond_k


@dataclasses.dataclass
class LastK(TokenSelector):
    """Keep tokens n-k..n-1 of a sample of n valid tokens."""

    name = "last_k"
    display_name = "Last-K"
    table_rank = 50
    aliases = ("lastk",)

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        t = torch.arange(k_max, device=lengths.device)
        return mask_beyond_k((lengths - k)[:, None] + t, k)
