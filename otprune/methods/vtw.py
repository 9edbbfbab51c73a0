"""VTW, visual tokens withdrawal (Lin et al., "Boosting Multimodal Large Language Models with
Visual Tokens Withdrawal for Rapid Inference", AAAI 2025): from layer L on, no visual token at
all. `BASELINE=VTW LAYER_INDEX=L` (L >= 1 required; `SUBSET_RATIO` is not used)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from otprune.methods.in_llm import InLLMRule, StageContext


@dataclasses.dataclass
class VTW(InLLMRule):
    """Withdraw every visual token at layer L."""

    name = "vtw"
    display_name = "VTW"
    table_rank = 10
    default_layer = None
    uses_ratio = False
    acts = "withdraws the visual tokens inside the LLM"

    def keep(self, ctx: StageContext) -> Tensor:
        return torch.empty(len(ctx.lengths), 0, dtype=torch.long, device=ctx.hidden.device)
