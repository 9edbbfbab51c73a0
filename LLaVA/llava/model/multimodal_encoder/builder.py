"""Build the vision tower named by a LLaVA config (`mm_vision_tower`)."""

from __future__ import annotations

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower


def build_vision_tower(vision_tower_cfg, **kwargs) -> CLIPVisionTower:
    """The CLIP vision tower of `mm_vision_tower` (a local directory or a hub id).

    Only CLIP towers are supported (all LLaVA-1.5 / 1.6 checkpoints use
    openai/clip-vit-large-patch14-336); other towers raise ValueError.
    """
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ValueError("mm_vision_tower: not set in the config; a LLaVA checkpoint names its CLIP vision tower there")
    return CLIPVisionTower(name, args=vision_tower_cfg, **kwargs)
