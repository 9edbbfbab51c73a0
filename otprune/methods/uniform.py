"""Uniform: keep k tokens evenly spaced over the token sequence.

Reference: the uniform-sampling baseline of the OTPrune paper (Sec. 3.2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.base import TokenSelector, mask_beyond_k


@dataclasses.dataclass
class Uniform(TokenSelector):
    """Keep index floor((2t + 1) * n / (2k)) for t = 0..k-1: the centres of k equal strides."""

    name = "uniform"
    display_name = "Uniform"
    table_rank = 60

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        t = torch.arange(k_max, device=lengths.device)
        k_safe = k.clamp_min(1)[:, None]
        return mask_beyond_k(((2 * t + 1) * lengths[:, None]).div(2 * k_safe, rounding_mode="floor"), k)
