"""`LAYER_INDEX = L > 0` with a feature-selection method of `otprune.METHODS` (OTPrune, DivPrune, ...):
each image keeps K = int(round(SUBSET_RATIO x V)) of its tokens, selected on the hidden states
entering layer L (all images of the batch in one batched `otprune.select_tokens` call, fp32)."""

from __future__ import annotations

from torch import Tensor

import otprune


def feature_keep(ctx) -> Tensor:
    """(I, K_max) kept indices per image, ascending, -1 padded."""
    features = ctx.image_values(ctx.hidden)  # (I, V_max, D); rows past an image's count are ignored
    config = ctx.config
    return otprune.select_tokens(
        features,
        float(config.ratio),
        config.method,
        lengths=ctx.lengths,
        order="ascending",
        **config.method_params(),
    )
