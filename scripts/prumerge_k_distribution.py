#!/usr/bin/env python3
"""PruMerge's adaptive budget K (IQR outliers of the CLS attention, at least 1) on the 10 images of
the `otprune_smoke` task: on a tiny LLaVA checkpoint's own tower, and on a CLIP-L/336-shaped tower
(24 layers, width 1024, 576 patches) with random weights (seeded; no pretrained weights needed).

    python scripts/prumerge_k_distribution.py DIR     # DIR: `otprune tiny-llava DIR`

Prints, per tower, K per image, the outlier counts, and min / median / max / mean of K.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from otprune.methods.prumerge import (
    capture_projections,
    cls_attention,
    consuming_layer,
    encoder_layers,
    iqr_outliers,
)

IMAGES = Path(__file__).resolve().parents[1] / "lmms_eval" / "tasks" / "otprune_smoke" / "images"


def budgets(tower, processor, select_layer: int) -> tuple[list[int], list[int], int]:
    """(K per image, outliers per image, N patches)."""
    attn = encoder_layers(tower)[consuming_layer(select_layer, len(encoder_layers(tower)))].self_attn
    ks, outliers, n = [], [], 0
    for path in sorted(IMAGES.glob("*.png")):
        pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad(), capture_projections(attn.q_proj, attn.k_proj) as got:
            tower(pixels.to(next(tower.parameters()).dtype), output_hidden_states=True)
        scores = cls_attention(got["q_cls"][0], got["keys"][0])
        count = int(iqr_outliers(scores).sum())
        outliers.append(count)
        ks.append(max(1, count))
        n = scores.shape[1]
    return ks, outliers, n


def show(name: str, ks: list[int], outliers: list[int], n: int) -> None:
    k = np.array(ks)
    print(f"{name}: N={n}, K per image {ks} (outliers {outliers}); "
          f"min {k.min()}, median {np.median(k):g}, max {k.max()}, mean {k.mean():.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a LLaVA checkpoint directory (e.g. from `otprune tiny-llava DIR`)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CLIP-L-shaped tower's random weights")
    args = parser.parse_args()
    from llava.model.builder import load_pretrained_model
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    _, model, processor, _ = load_pretrained_model(args.checkpoint, None, "tiny-llava", device_map="cpu")
    tower = model.get_vision_tower()
    show(f"{args.checkpoint} (its tower)", *budgets(tower.vision_tower, processor, tower.select_layer))
    torch.manual_seed(args.seed)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, image_size=336, patch_size=14)).eval()
    clip_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    show(f"CLIP-L/336-shaped tower, random weights (seed {args.seed})", *budgets(clip, clip_processor, -2))


if __name__ == "__main__":
    main()
