"""VisionZip inside vLLM's CLIP tower (LLaVA-1.5, LLaVA-NeXT): the plugin's merge path.

VisionZip (`otprune.methods.visionzip`) reads, per crop (one CLIP forward), the layer that
PRODUCES the selected hidden state (`vision_feature_layer`, -2: the last layer vLLM builds, since
it builds the tower only up to that hidden state): its output WITH the CLS row, its CLS query and
its keys. vLLM's CLIP layer projects q, k and v with one fused `qkv_proj`; a forward hook on it
gives q and k (the first two thirds of its output, as vLLM's `CLIPAttention` splits them), a
forward hook on the layer gives its output. Both hooks live only for the tower call of the
pruned images. The K merged rows per crop (CLS, dominant patches, contextual tokens, in
VisionZip's order, in the tower's hidden space) go through vLLM's own projector; an image's
rows are its crops' rows in crop order (LLaVA-NeXT: base crop first, no unpadding, no newline
rows, as our llava and `otprune.hf`). An image at ratio 1 gets vLLM's own unpruned rows.

The processor inserts K = crops x VisionZip's per-crop budget (`VisionZip.budget(N, r)`)
placeholders (`keep_counts`); the model checks each image's rows against them.

Refused when the model loads (the worker builds it at engine start): a tower without a CLS token
(SigLIP: `NoClsTokenError`), `vision_feature_layer` other than one int, a select strategy other
than "default", tensor parallelism > 1 (the hooks would see one shard's heads).

Imports vLLM lazily (the model modules import this one inside vLLM's processes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from otprune.config import PruneConfig


def merges_in_tower(config: PruneConfig) -> bool:
    """True when `config`'s method is merged inside the vision tower by the plugin (VisionZip; also
    when the engine's switches are off and only requests prune: the environment's method)."""
    return config.merges_up_to_selected


def keep_counts(config: PruneConfig, ratio: float, crops: Sequence[int], crop_patches: int) -> list[int]:
    """K per image for a tower merge at ratio < 1: crops x the method's budget of a crop of
    `crop_patches` patches (`VisionZip.budget`). (At ratio 1 the image keeps vLLM's T rows.)"""
    per_crop = config.merger().budget(crop_patches, ratio)
    return [int(c) * per_crop for c in crops]


def _layers(tower):
    model = getattr(tower, "vision_model", tower)
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or not len(layers) or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "qkv_proj"):
        return None
    return layers


class TowerMergeMixin:
    """Model mixin (before `PruneModelMixin` in the bases): VisionZip in vLLM's CLIP tower."""

    def otprune_tower_setup(self) -> None:
        """Checks the tower when the engine's method merges in the tower (raises at model load)."""
        self.otprune_tower_merge = merges_in_tower(self.otprune_config)
        if not self.otprune_tower_merge:
            return
        from transformers import CLIPVisionConfig

        from otprune.methods.prumerge import no_cls_error
        from otprune.methods.visionzip import producing_layer

        method = self.otprune_config.method.upper()
        vision = self.config.vision_config
        if not isinstance(vision, CLIPVisionConfig):
            raise no_cls_error(method, f"{type(vision).__name__} ({type(self).__name__})")
        layer = self.config.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: BASELINE={method} reads the attention of the layer "
                             "producing ONE selected hidden state; several concatenated layers are not supported")
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: BASELINE={method} needs the CLS token "
                             "dropped from the patches (strategy 'default'); only 'default' is supported")
        layers = _layers(self.vision_tower)
        if layers is None:
            raise no_cls_error(method, type(self.vision_tower).__name__)
        index = producing_layer(layer, int(vision.num_hidden_layers))
        if index >= len(layers):
            raise ValueError(f"vision_feature_layer={layer}: the tower has {len(layers)} layers built, layer {index} "
                             "produces the selected hidden state")
        attn = layers[index].self_attn
        if int(attn.num_heads_per_partition) != int(attn.num_heads):
            raise ValueError(f"BASELINE={method}: the vision tower is split over {attn.tp_size} tensor-parallel ranks; "
                             "the plugin's VisionZip reads every head of one rank (tensor_parallel_size=1 only)")
        self.otprune_producing = layers[index]

    @contextlib.contextmanager
    def otprune_capture(self):
        """Hooks on the producing layer: yields {"hidden": [(P, 1 + N, C)], "q_cls": [(P, C)], "keys": [(P, 1 + N, C)]}."""
        got: dict[str, list[Tensor]] = {"hidden": [], "q_cls": [], "keys": []}
        block = self.otprune_producing

        def on_qkv(_module, _args, output):
            qkv = output[0] if isinstance(output, tuple) else output  # (P, 1 + N, 3C)
            q, k, _ = qkv.chunk(3, dim=-1)
            got["q_cls"].append(q[..., 0, :].detach())
            got["keys"].append(k.detach())

        def on_layer(_module, _args, output):
            got["hidden"].append((output[0] if isinstance(output, tuple) else output).detach())

        handles = [block.self_attn.qkv_proj.register_forward_hook(on_qkv), block.register_forward_hook(on_layer)]
        try:
            yield got
        finally:
            for handle in handles:
                handle.remove()

    def otprune_tower(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """vLLM's tower on crops (P, 3, H, W) with the hooks -> (patches (P, N, C) as vLLM selects
        them, hidden (P, 1 + N, C), q_cls (P, C), keys (P, 1 + N, C)) of the producing layer."""
        with self.otprune_capture() as got:
            patches = self._image_pixels_to_features(self.vision_tower, pixel_values)
        if len(got["hidden"]) != 1 or len(got["q_cls"]) != 1:
            raise AssertionError(f"otprune: expected one pass through the producing layer, saw {len(got['hidden'])}")
        return patches, got["hidden"][0], got["q_cls"][0], got["keys"][0]

    def otprune_merge(self, hidden: Tensor, q_cls: Tensor, keys: Tensor, keep: int) -> tuple[Tensor, Tensor]:
        """An image's crops (c, 1 + N, C), merged to `keep` tokens in all -> (rows (keep, D) projected,
        sources (keep,): crop c's patch j is c N + j, the CLS rows `CLS`)."""
        from otprune.methods.visionzip import CLS, visionzip

        crops, n = hidden.shape[0], hidden.shape[1] - 1
        if keep % crops:
            raise AssertionError(f"otprune: {keep} placeholders for an image of {crops} crops (not a multiple)")
        heads = int(self.otprune_producing.self_attn.num_heads)
        merger = self.otprune_config.merger()
        tokens, sources = visionzip(hidden, q_cls, keys, heads, keep // crops, merger.contextual)  # (c, k, C), (c, k)
        offsets = (torch.arange(crops, device=sources.device) * n)[:, None]
        sources = torch.where(sources == CLS, sources, sources + offsets).reshape(-1)
        rows = self.multi_modal_projector(tokens.reshape(-1, tokens.shape[-1]).to(hidden.dtype))
        return rows, sources

    def otprune_note(self, rows: Tensor, sources: Tensor, total: int, keep: int) -> None:
        if rows.shape[0] != keep:
            raise AssertionError(f"otprune: merged {rows.shape[0]} rows for {keep} placeholders")
        if self.otprune_record is not None:
            self.otprune_record.append({"rows": rows.detach().float().cpu(), "sources": sources.cpu(),
                                        "total": total, "keep": keep})  # fmt: skip
