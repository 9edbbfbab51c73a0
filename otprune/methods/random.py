"""Random: keep a uniformly random subset of the tokens, reproducibly.

Reference: the random-sampling baseline of the OTPrune paper (Sec. 3.2).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.base import TokenSelector, valid_mask


@dataclasses.dataclass
class RandomSelect(TokenSelector):
    """Keep k tokens drawn uniformly without replacement.

    Every position gets a score from `torch.rand` on a CPU generator seeded with `seed`; a
    sample keeps its k valid positions with the highest scores. The result depends only on
    (seed, the sample's length, k): the same on every device, alone or inside a padded batch.
    Change `seed` (env `OTPRUNE_SEED`) for another draw.
    """

    seed: int = 0
    name = "random"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"random seed={self.seed!r}: must be an integer")

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        n = features.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(n, generator=generator, dtype=torch.float64).to(features.device)
        scores = scores.expand(features.shape[0], n).masked_fill(~valid_mask(lengths, n), -1.0)
        return scores.topk(k_max, dim=1).indices
