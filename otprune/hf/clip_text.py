"""CDPruner's CLIP text side: the text tower paired with a CLIP vision tower, for the relevance of
each patch to the instruction (`otprune.methods.cdpruner`, step 2).

CDPruner's official code loads `CLIPTextModelWithProjection` (and the vision side's
`visual_projection`) from the same full CLIP checkpoint as the vision tower
(openai/clip-vit-large-patch14-336 for LLaVA-1.5 / 1.6). Our llava finds it by `mm_vision_tower`;
transformers' llava-hf checkpoints carry the vision weights only, so `otprune.hf` and the vLLM
plugin take its name from `CDPRUNER_CLIP` (`otprune.config.cdpruner_clip`) or the adapter's
`clip_checkpoint`.

    side = ClipTextSide.load("openai/clip-vit-large-patch14-336", dtype=torch.float16, device="cuda")
    text = side.text_embeds("What color is the box?")        # (M, C') one row per 77-token segment
    image = side.joint_embeds(patches, post_layernorm)        # (P, N, C') fp32
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

WHAT = "BASELINE=CDPRUNER"


def check_clip(name: str, what: str) -> None:
    """ValueError (naming `what`, the switch or key that named it) unless `name` is a loadable full CLIP checkpoint."""
    from transformers import AutoConfig

    try:
        kind = getattr(AutoConfig.from_pretrained(name), "model_type", None)
    except (OSError, ValueError) as err:
        raise ValueError(f"{WHAT}: {what}={name!r} is not a loadable CLIP checkpoint ({err}); name the full CLIP "
                         "checkpoint paired with the vision tower, e.g. openai/clip-vit-large-patch14-336") from None
    if kind != "clip":
        raise ValueError(
            f"{WHAT}: scores each patch against the instruction with the CLIP text tower paired with the vision "
            f"tower, but {what}={name!r} is a {kind!r} checkpoint without one; name the full CLIP checkpoint "
            "(e.g. openai/clip-vit-large-patch14-336) or pick another method"
        )


def load_tokenizer(name: str, what: str = "CDPRUNER_CLIP"):
    """The `CLIPTokenizer` of the full CLIP checkpoint `name` (checked as `check_clip`)."""
    from transformers import CLIPTokenizer

    check_clip(name, what)
    return CLIPTokenizer.from_pretrained(name)


def instruction_ids(tokenizer, text: str) -> Tensor:
    """(L,) long: the instruction's CLIP token ids (start and end tokens included, not cut)."""
    return torch.tensor(tokenizer(text=[text])["input_ids"][0], dtype=torch.long)


def segments(ids: Tensor, context: int) -> dict[str, Tensor]:
    """ids: (L,) -> {"input_ids", "attention_mask"}: (M, context) each, the ids zero padded to a multiple
    of the context length and cut into rows (CDPruner's way of encoding a long instruction)."""
    ids = ids.reshape(-1).long()
    pad = -ids.numel() % context
    mask = torch.cat([torch.ones_like(ids), ids.new_zeros(pad)])
    return {"input_ids": torch.cat([ids, ids.new_zeros(pad)]).reshape(-1, context), "attention_mask": mask.reshape(-1, context)}


@dataclasses.dataclass
class ClipTextSide:
    """The text tower, its tokenizer and the vision side's `post_layernorm` / `visual_projection` of one CLIP checkpoint.

    Attributes:
        name: the checkpoint (hub name or folder).
        text: `CLIPTextModelWithProjection` (no gradients), fp32, on the vision tower's device.
        projection: the vision side's `visual_projection` (fp32, as CDPruner computes it).
        tokenizer: the checkpoint's `CLIPTokenizer`.
        post_layernorm: the checkpoint's vision `post_layernorm` (for a tower built without it, as vLLM's).
    """

    name: str
    text: nn.Module
    projection: nn.Module
    tokenizer: object
    post_layernorm: nn.Module | None = None

    @classmethod
    def load(cls, name: str, *, dtype: torch.dtype, device: torch.device | str, what: str = "CDPRUNER_CLIP") -> ClipTextSide:
        """Load the text side of the full CLIP checkpoint `name` on `device`; ValueError (naming
        `what`, the switch or key that named it) when it is not a CLIP checkpoint or lacks the text
        weights. The text tower and `visual_projection` run in fp32 whatever the model's dtype (the
        official code loads them with transformers' default dtype); the checkpoint's
        `post_layernorm` in `dtype` (the vision tower's, where the official code applies it)."""
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        tokenizer = load_tokenizer(name, what)
        loaded = {}
        for key, model_class in (("text", CLIPTextModelWithProjection), ("vision", CLIPVisionModelWithProjection)):
            model, info = model_class.from_pretrained(name, dtype=torch.float32, output_loading_info=True)
            missing = [k for k in info["missing_keys"] if key == "text" or "visual_projection" in k]
            if missing:
                raise ValueError(f"{WHAT}: {what}={name!r} lacks the CLIP {key} weights {missing[:3]}")
            loaded[key] = model.to(device).requires_grad_(False)
        vision = loaded["vision"]
        norm = getattr(vision, "vision_model", vision).post_layernorm.to(dtype)
        return cls(name, loaded["text"], vision.visual_projection, tokenizer, norm)

    @property
    def context(self) -> int:
        """The text tower's context length (77 for OpenAI's CLIP)."""
        return int(self.text.config.max_position_embeddings)

    @torch.no_grad()
    def embed_ids(self, ids: Tensor) -> Tensor:
        """ids: (L,) the instruction's CLIP token ids -> (M, C') one text embedding per segment (`segments`)."""
        device = next(self.text.parameters()).device
        rows = {key: value.to(device) for key, value in segments(ids, self.context).items()}
        return self.text(**rows).text_embeds

    def text_embeds(self, text: str) -> Tensor:
        """(M, C') the instruction's CLIP text embeddings, one per segment (`segments`)."""
        return self.embed_ids(instruction_ids(self.tokenizer, text))

    @torch.no_grad()
    def joint_embeds(self, patches: Tensor, post_layernorm: nn.Module | None = None) -> Tensor:
        """patches: (..., N, C) the selected hidden state's patches -> (..., N, C') in CLIP's joint
        space: the vision tower's own `post_layernorm` (in its dtype; None: the checkpoint's), then
        `visual_projection` in fp32."""
        norm = self.post_layernorm if post_layernorm is None else post_layernorm
        dtype = next(norm.parameters()).dtype
        return self.projection(norm(patches.to(dtype)).float())


def post_layernorm(tower: nn.Module) -> nn.Module:
    """The `post_layernorm` of a CLIP vision tower (`CLIPVisionModel` or its `vision_model`)."""
    for module in (tower, getattr(tower, "vision_model", None)):
        norm = getattr(module, "post_layernorm", None)
        if norm is not None:
            return norm
    raise ValueError(f"{WHAT}: the vision tower {type(tower).__name__} has no post_layernorm (not a CLIP tower); "
                     "CDPruner's relevance needs a CLIP vision tower")
