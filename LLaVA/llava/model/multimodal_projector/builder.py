"""The projector from vision-tower features to the LLM's embedding space (`mm_projector`)."""

from __future__ import annotations

import re

from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """`mm_projector_type`: "linear" (LLaVA-1.0), "mlpNx_gelu" (N linear layers with GELU between;
    LLaVA-1.5 / 1.6 use mlp2x_gelu) or "identity". Maps `mm_hidden_size` to `hidden_size`.

    Parameter names follow the original checkpoints: `mm_projector.0.*`, `mm_projector.2.*`, ...
    """
    kind = getattr(config, "mm_projector_type", "linear")
    if kind == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    if kind == "identity":
        return IdentityMap()
    match = _MLP_GELU.match(str(kind))
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"mm_projector_type={kind!r}: must be 'linear', 'identity' or 'mlpNx_gelu' (e.g. 'mlp2x_gelu')")
    layers: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
    return nn.Sequential(*layers)
