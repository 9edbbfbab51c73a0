"""Random: keep a uniformly random subset of the tokens, reproducibly.

Reference: the random-sampling baseline of the OTPrune paper (Sec. 3.2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.base import TokenSelector, mask_beyond_k, param, valid_mask

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    hi, lo = constant >> 16, constant & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply, "lowbias32" constants) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def position_scores(seed: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n,) float64 pseudo-random scores in [0, 1), a function of (seed, position) only.

    Being a bijective hash of the position, the scores never tie, are the same on every
    device, and a prefix does not depend on n.
    """
    key = hash32(hash32(torch.tensor(seed & _MASK32, dtype=torch.int64)))
    positions = torch.arange(n, dtype=torch.int64, device=device)
    mixed = (_mul32(positions, 0x9E3779B9) + key.to(device)) & _MASK32  # a bijection of the position
    return hash32(hash32(mixed)).double() / 2.0**32


@dataclasses.dataclass
class RandomSelect(TokenSelector):
    """Keep k tokens drawn uniformly without replacement.

    Every position gets a pseudo-random score from (seed, position); a sample keeps its k
    valid positions with the highest scores. The result depends only on (seed, the sample's
    length, k): the same on every device, alone or inside a padded batch. Change `seed` (env
    `OTPRUNE_SEED`) for another draw.
    """

    seed: int = param(0, env="OTPRUNE_SEED", tag="s", label="seed", kind=int, doc="an integer")
    name = "random"
    display_name = "Random"
    table_rank = 70

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"random seed={self.seed!r}: must be an integer")

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        n = features.shape[1]
        scores = position_scores(self.seed, n, features.device)  # (N,)
        scores = scores.expand(features.shape[0], n).masked_fill(~valid_mask(lengths, n), -1.0)
        return mask_beyond_k(scores.topk(k_max, dim=1).indices, k)
