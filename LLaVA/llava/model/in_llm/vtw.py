"""VTW, visual tokens withdrawal (Lin et al., "Boosting Multimodal Large Language Models with Visual
Tokens Withdrawal for Rapid Inference", AAAI 2025): from layer L on, no visual token at all.
`BASELINE=VTW LAYER_INDEX=L` (L >= 1; SUBSET_RATIO is not used)."""

from __future__ import annotations

import torch
from torch import Tensor


def vtw_keep(ctx) -> Tensor:
    """Keep nothing: (I, 0)."""
    return torch.empty(len(ctx.lengths), 0, dtype=torch.long, device=ctx.hidden.device)
