"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024).

At layer L (`LAYER_INDEX`, default 2) each image keeps its K = int(round(SUBSET_RATIO x V))
visual tokens that receive the most attention in layer L-1 from the last token of the prompt,
averaged over heads. The model side computes only that one attention row
(`StageContext.last_token_attention`); the model keeps its sdpa / flash attention.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from otprune.methods.in_llm import InLLMRule, StageContext, top_k


@dataclasses.dataclass
class FastV(InLLMRule):
    """Keep each image's tokens most attended by the prompt's last token in layer L-1."""

    name = "fastv"
    display_name = "FastV"
    table_rank = 20
    default_layer = 2
    acts = "ranks the visual tokens by the attention in layer L-1"

    def keep(self, ctx: StageContext) -> Tensor:
        return top_k(ctx.last_token_attention(), ctx.lengths, ctx.keep)
