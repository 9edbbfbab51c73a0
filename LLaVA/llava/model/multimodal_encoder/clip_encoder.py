"""The CLIP vision tower of LLaVA.

Runs transformers' `CLIPVisionModel` and returns the hidden states of layer
`mm_vision_select_layer` (-2, the second to last, in LLaVA-1.5 / 1.6), without the CLS token
(`mm_vision_select_feature="patch"`) or with it (`"cls_patch"`).

Weights: the module exists from construction (built from the tower's config only); its weights
come either from the LLaVA checkpoint itself (LLaVA-1.6 fine-tuned the tower and saves it as
`model.vision_tower.vision_tower.*`) or, when the checkpoint has none (LLaVA-1.5), from the
tower named by `mm_vision_tower` via `load_model()`, which `load_pretrained_model` calls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

SELECT_FEATURES = ("patch", "cls_patch")


def load_image_processor(name: str):
    """The CLIP image processor of a tower: the PIL backend (as the original LLaVA used) when available."""
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as processor_class,
        )
    except ImportError:  # older transformers: the PIL processor is the default class
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(name)


class CLIPVisionTower(nn.Module):
    """images: (N, 3, S, S) -> features (N, T, C); T = (S / patch)^2 (+1 with "cls_patch")."""

    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        super().__init__()
        self.vision_tower_name = str(vision_tower)
        self.select_layer = int(getattr(args, "mm_vision_select_layer", -2))
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r}: must be one of {', '.join(SELECT_FEATURES)}"
            )
        self.cfg_only = CLIPVisionConfig.from_pretrained(self.vision_tower_name)
        layers = self.cfg_only.num_hidden_layers
        if not -(layers + 1) <= self.select_layer <= layers:
            raise ValueError(
                f"mm_vision_select_layer={self.select_layer}: the tower has {layers} layers, so it must be in "
                f"[-{layers + 1}, {layers}]"
            )
        impl = getattr(args, "_attn_implementation", None)
        if impl in ("eager", "sdpa", "flash_attention_2"):
            self.cfg_only._attn_implementation = impl
        self.vision_tower = CLIPVisionModel(self.cfg_only)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = not delay_load
        self._image_processor = None

    def load_model(self, device_map=None, dtype: torch.dtype | None = None) -> None:
        """Load the tower's own weights from `mm_vision_tower`, on the device and dtype it has now."""
        param = next(self.vision_tower.parameters())
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        model = CLIPVisionModel.from_pretrained(
            self.vision_tower_name,
            dtype=dtype or param.dtype,
            attn_implementation=self.vision_tower.config._attn_implementation,
        )
        self.vision_tower = model.to(device)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = load_image_processor(self.vision_tower_name)
        return self._image_processor

    @image_processor.setter
    def image_processor(self, value) -> None:
        self._image_processor = value

    def feature_select(self, hidden_states: tuple[Tensor, ...]) -> Tensor:
        features = hidden_states[self.select_layer]
        return features[:, 1:] if self.select_feature == "patch" else features

    @torch.no_grad()
    def forward(self, images: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(images, (list, tuple)):
            return [self.forward(image.unsqueeze(0))[0] for image in images]
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(out.hidden_states)

    @torch.no_grad()
    def forward_with_cls(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images: (P, 3, S, S) crops -> (features (P, N, C) the selected layer's patches,
        q_cls (P, C), keys (P, 1 + N, C)): the query of the CLS token and the keys of every token
        in the layer that reads the selected hidden state (PruMerge's CLS attention; captured by
        forward hooks on its q_proj / k_proj only during this call)."""
        from otprune.methods.prumerge import capture_projections, consuming_layer, encoder_layers

        if self.select_feature != "patch":
            raise ValueError(
                f"mm_vision_select_feature={self.select_feature!r}: PruMerge and the adaptive budget score the patches "
                "without the CLS token; only 'patch' is supported"
            )
        layers = encoder_layers(self.vision_tower, self.vision_tower_name)
        attn = layers[consuming_layer(self.select_layer, len(layers))].self_attn
        with capture_projections(attn.q_proj, attn.k_proj) as got:
            out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(out.hidden_states), got["q_cls"][0], got["keys"][0]

    @torch.no_grad()
    def forward_with_cls_row(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """VisionZip's inputs. images: (P, 3, S, S) -> (hidden (P, 1 + N, C) the selected hidden
        state WITH its CLS row, q_cls (P, C), keys (P, 1 + N, C), heads): the CLS query and every
        key of the layer that PRODUCES the selected hidden state (hooks only during this call)."""
        from otprune.methods.prumerge import capture_projections, encoder_layers
        from otprune.methods.visionzip import producing_layer

        layers = encoder_layers(self.vision_tower, self.vision_tower_name)
        attn = layers[producing_layer(self.select_layer, len(layers))].self_attn
        with capture_projections(attn.q_proj, attn.k_proj) as got:
            out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer], got["q_cls"][0], got["keys"][0], int(self.config.num_attention_heads)

    # ------------------------------------------------------------ CDPruner's CLIP text side
    def load_text_tower(self) -> None:
        """CDPruner's instruction relevance needs the CLIP text tower paired with this vision tower:
        `CLIPTextModelWithProjection`, its tokenizer and the vision side's `visual_projection`, all
        from the checkpoint `mm_vision_tower` names (a full CLIP checkpoint, as openai/clip-vit-large-
        patch14-336; `otprune.hf.clip_text.ClipTextSide`). Loaded once, on this tower's device (the
        text tower and the projection in fp32, as the official code); ValueError when it has no text side."""
        if getattr(self, "_text_side", None) is not None:
            return
        from otprune.hf.clip_text import ClipTextSide

        # not a submodule of the tower (its state dict and checkpoint stay the model's own)
        self.__dict__["_text_side"] = ClipTextSide.load(self.vision_tower_name, dtype=self.dtype, device=self.device,
                                                        what="mm_vision_tower")

    def text_embeds(self, text: str) -> Tensor:
        """(M, C) the instruction's CLIP text embeddings, one per segment of the tower's context
        length (77): the token ids zero padded to a multiple of it, then cut into rows (CDPruner's way)."""
        self.load_text_tower()
        return self._text_side.text_embeds(text)

    def joint_embeds(self, patches: Tensor) -> Tensor:
        """patches: (P, N, C) the selected hidden state's patches -> (P, N, C') in CLIP's joint space
        (`post_layernorm`, then `visual_projection`, in fp32 as CDPruner does)."""
        from otprune.hf.clip_text import post_layernorm

        self.load_text_tower()
        return self._text_side.joint_embeds(patches, post_layernorm(self.vision_tower))

    @property
    def dummy_feature(self) -> Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2
