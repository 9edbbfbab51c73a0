"""First-K: keep the first k tokens (the top rows of the patch grid).

Reference: the first-K baseline of the OTPrune paper (Sec. 3.2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.base import TokenSelector, mask_beyond_k


@dataclasses.dataclass
class FirstK(TokenSelector):
    """Keep tokens 0..k-1."""

    name = "first_k"
    display_name = "First-K"
    table_rank = 40
    aliases = ("firstk",)

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        return mask_beyond_k(torch.arange(k_max, device=lengths.device).expand(lengths.shape[0], k_max), k)
