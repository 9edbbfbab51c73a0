"""The interface every token-selection method implements, and small shared tensor helpers.

A method sees a padded batch and returns, per sample, the indices it keeps in the order it
picked them. Everything that is not specific to one method (argument checks, dtype handling,
ragged lengths, sorting) lives in `otprune.selection.select_tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor


@dataclasses.dataclass
class TokenSelector:
    """Base class of the selection methods.

    Subclasses are dataclasses whose fields are the method's parameters, and implement
    `select`. They must not synchronise with the host inside their loops (no `.item()`, no
    `.tolist()`, no Python branching on tensor values), so that a whole selection can be
    captured by `torch.compile(fullgraph=True)` and queued on a GPU without stalls.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()

    def official_order(self, picks: list[int]) -> list[int]:
        """The kept tokens, given in pick order, in the order the method's official code hands them
        to the LLM (`OTPRUNE_ORDER=official`, for exact reproduction of published runs).

        Default: ascending token order (DivPrune's code sorts its kept indices; the other
        baselines have no official order of their own). OTPrune overrides it with its code's
        set order.
        """
        return sorted(int(i) for i in picks)

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        """Pick tokens.

        Args:
            features: (B, N, D) in the compute dtype (fp32, or fp64 for fp64 input); rows at
                positions >= lengths[b] are padding and are zero.
            lengths: (B,) long, valid tokens per sample, 1 <= lengths[b] <= N.
            k: (B,) long, tokens to keep per sample, 1 <= k[b] <= lengths[b].
            k_max: int, max(k) (a Python int so that the loop length is static).

        Returns:
            (B, k_max) long: sample b's picks in selection order in its first k[b] slots,
            -1 in the rest.
        """
        raise NotImplementedError


def valid_mask(lengths: Tensor, n: int) -> Tensor:
    """(B,) lengths -> (B, N) bool, True at real (non-padding) positions."""
    return torch.arange(n, device=lengths.device) < lengths[:, None]


def mask_beyond_k(picks: Tensor, k: Tensor) -> Tensor:
    """Set slots t >= k[b] of picks: (B, k_max) to -1."""
    slot = torch.arange(picks.shape[1], device=picks.device)
    return picks.masked_fill(slot >= k[:, None], -1)


def flat_rows(matrix: Tensor):
    """A `kernel_row` for the greedy: (j, flat) -> matrix[b, j[b], :] for matrix: (B, N, M)."""
    rows = matrix.reshape(-1, matrix.shape[-1])  # (B * N, M), a view for contiguous input
    return lambda j, flat: rows.index_select(0, flat)
