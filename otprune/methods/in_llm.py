"""The interface of the rules that prune inside the LLM (`LAYER_INDEX > 0`, FastV, VTW, FitPrune).

A rule is one file in `otprune/methods/` (a dataclass subclass of `InLLMRule`), registered in
`otprune.methods.REGISTRY` beside the selection methods. The rule is pure: the model side (our
`llava` decoder, `llava.model.in_llm`) computes what a rule asks for at a decoder layer and hands
it over as a `StageContext`; the rule returns which visual tokens of each image stay.

A selection method of `otprune.METHODS` at `LAYER_INDEX = L > 0` runs through
`otprune.selection.feature_keep`: the same selection, on the hidden states entering layer L.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from otprune.methods.base import Method


class StageContext(Protocol):
    """What the model hands a rule at one pruning stage (one decoder layer).

    lengths: per image, its visual tokens present before this stage; keep: per image, how many
    stay (from `SUBSET_RATIO` or the recipe); hidden: (B, N, D) the hidden states entering the
    layer; `image_values(x)`: (B, N, ...) -> (I, V_max, ...) each image's rows of x;
    `last_token_attention()`: (I, V_max) attention each image token gets from its sample's last
    token in the previous layer (head mean); `received_attention()`: (self, cross), two
    (I, V_max) attention masses each image token receives in this layer (FitPrune's statistics).
    """

    lengths: list[int]
    keep: list[int]
    hidden: Tensor
    layer: int
    config: object

    def image_values(self, values: Tensor) -> Tensor: ...

    def last_token_attention(self) -> Tensor: ...

    def received_attention(self) -> tuple[Tensor, Tensor]: ...


@dataclasses.dataclass
class InLLMRule(Method):
    """Base class of the rules that drop visual tokens inside the LLM.

    default_layer: `LAYER_INDEX` when unset (None: the user must give it); uses_ratio: whether
    `SUBSET_RATIO` sets the kept count; acts: what the rule does at layer L (error messages).
    """

    kind: ClassVar[str] = "in_llm"
    default_layer: ClassVar[int | None] = None
    uses_ratio: ClassVar[bool] = True
    acts: ClassVar[str] = "prunes inside the LLM"

    def resolve(self, layer: int | None, ratio: float | None, recipe: object) -> tuple[int, float | None, object]:
        """A config's (layer, ratio, recipe), checked and completed for this rule; ValueError naming
        the variable otherwise."""
        if recipe is not None:
            raise ValueError(f"recipe: only for method 'fitprune', got method={self.name!r}")
        if layer is None:
            if self.default_layer is None:
                raise ValueError(
                    f"LAYER_INDEX: not set; {self.name.upper()} needs the layer where it acts, an integer >= 1"
                )
            layer = self.default_layer
        if layer < 1:
            default = f" ({self.label()}'s default: {self.default_layer})" if self.default_layer is not None else ""
            raise ValueError(f"layer={layer} (LAYER_INDEX): {self.name.upper()} {self.acts}; use a layer >= 1{default}")
        return layer, (ratio if self.uses_ratio else None), None

    def schedule(self, config, tokens: int, num_layers: int) -> list[int]:
        """Visual tokens present at each decoder layer's input for an image of `tokens` tokens."""
        kept = round(config.ratio * tokens) if self.uses_ratio else 0
        return [tokens] * config.layer + [kept] * (num_layers - config.layer)

    def check_model(self, config, num_layers: int, hidden_size: int, intermediate_size: int) -> None:
        """Refuse a model this config cannot run on (ValueError); nothing to check by default."""

    def keep(self, ctx: StageContext) -> Tensor:
        """(I, K_max) indices of the tokens each image keeps at this stage, ascending, -1 padded."""
        raise NotImplementedError


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
