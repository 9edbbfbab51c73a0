"""OTPrune on transformers' own, unmodified `Qwen3VLForConditionalGeneration` and
`Qwen3_5ForConditionalGeneration` (layer 0).

    from otprune import hf
    adapter = hf.apply(model, otprune.PruneConfig(method="otprune", layer=0, ratio=0.25))
    out = model.generate(**processor(text=texts, images=images, return_tensors="pt"))

Qwen3-VL's multimodal step is Qwen2.5-VL's (merged visual tokens scattered over the
`<|image_pad|>` / `<|video_pad|>` placeholders, 3-D M-RoPE positions from `get_rope_index`), so
the adapter is `Qwen2_5_VLAdapter` (see `otprune.hf.qwen2_5_vl`: one batched selection per batch,
every kept token keeps its unpruned M-RoPE position, decoding continues from the unpruned
positions) plus DeepStack:

- DeepStack: the vision tower also returns, per DeepStack layer l, one feature (T_i, D) per
  visual token (`deepstack_features[l][i]`), which the LLM adds to the hidden state of that
  token's row after decoder layer l (`visual_pos_masks`, `deepstack_visual_embeds`). The adapter
  keeps, for every layer, the rows of the kept tokens (the same indices as the embeddings) in the
  order the pruned sequence holds them, and hands them to the LLM with the pruned sequence's
  visual mask: it wraps `model.model.language_model.forward` on the instance, which adds these
  two inputs to the pruned prefill's call only (otherwise it calls straight through).
- Video: a video is one token set (all its frames, T * H * W / 4 tokens), as for Qwen2.5-VL; the
  timestamps text between its frames (`<0.5 seconds>`) is text and is never dropped.

Qwen3.5 (`Qwen3_5ForConditionalGeneration`): its vision path is Qwen3-VL's vision tower without
DeepStack (transformers' `Qwen3_5VisionModel` deletes the DeepStack mergers; its model forward
passes no visual inputs to the LLM besides the embeddings) and its `get_rope_index` is
Qwen3-VL's; the LLM differs (Gated DeltaNet layers mixed with attention layers), which layer-0
pruning does not touch. `Qwen3_5Adapter` is this adapter with no DeepStack to prune.

The MoE models (`Qwen3VLMoeForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`) have
the same vision path and multimodal step: `Qwen3VLMoeAdapter` / `Qwen3_5MoeAdapter`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from otprune.hf.base import CompactBatch
from otprune.hf.qwen2_5_vl import Qwen2_5_VLAdapter, VisualSets


def deepstack_of_kept(
    deepstack: list[list[Tensor]], sets: VisualSets, kept: list[Tensor], compact: CompactBatch, shape: tuple[int, int]
) -> tuple[Tensor, list[Tensor]]:
    """The DeepStack inputs of the pruned sequence.

    Args:
        deepstack: per DeepStack layer, per token set (in the order of `sets`), (T_i, D) features.
        sets / kept: the token sets' placeholder rows and their kept indices (K_i,).
        compact: the pruned batch (its `index` maps each new row to its input row).
        shape: (B, L) of the unpruned input.

    Returns:
        visual_pos_masks: (B, L') bool, True on the kept visual rows of the pruned sequence;
        embeds: per layer, (sum K_i, D): the kept rows' features in row-major order of that mask
        (the order in which the LLM adds them).
    """
    batch, length = shape
    rows = torch.cat(sets.rows)  # (sum T_i,) flat input rows of all visual tokens
    device = compact.index.device
    visual = torch.zeros(batch * length, dtype=torch.bool, device=device)
    visual[torch.cat([r[k.to(r.device)] for r, k in zip(sets.rows, kept, strict=True)]).to(device)] = True
    mask = compact.gather(visual.view(batch, length), fill=False)  # (B, L')
    embeds = []
    for layer in deepstack:
        values = torch.cat(list(layer))  # (sum T_i, D)
        full = values.new_zeros(batch * length, values.shape[-1])
        full[rows.to(values.device)] = values
        embeds.append(compact.gather(full.view(batch, length, -1))[mask.to(values.device)])
    return mask, embeds


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Prunes the merged visual tokens of every image / video of `Qwen3VLForConditionalGeneration`,
    and their DeepStack features with the same indices.

    Wraps `model.forward` and `model.model.language_model.forward` on the instance. Supported:
    `LAYER_INDEX=0` with every method of `otprune.METHODS`; the rest raises ValueError.
    """

    family: ClassVar[str] = "qwen3_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)

    def __init__(self, model, config=None) -> None:
        super().__init__(model, config)
        self._deepstack: tuple[Tensor, list[Tensor]] | None = None  # staged for the pruned prefill's LLM call

    def _install(self) -> None:
        super()._install()
        language_model = self.model.model.language_model

        def forward(*args: Any, **kwargs: Any):
            staged, self._deepstack = self._deepstack, None
            if staged is not None:
                kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = staged
            return self._language_forward(*args, **kwargs)

        self._language_forward = self.patch(language_model, "forward", forward)

    def _prepare_llm(self, encoded, sets, kept, compact, shape) -> None:
        layers = [getattr(output, "deepstack_features", None) for output in encoded]
        if not sets.rows or not any(layers):
            return
        if not all(layers) or len({len(item) for item in layers}) != 1:
            raise ValueError("mm_encoder_outputs: every modality needs the same number of deepstack_features layers")
        # per layer, the per-set features of every modality in the order of `sets` (images, then videos)
        deepstack = [[t for item in layers for t in item[layer]] for layer in range(len(layers[0]))]
        self._deepstack = deepstack_of_kept(deepstack, sets, kept, compact, shape)

    def _release_llm(self) -> None:
        self._deepstack = None


class Qwen3_5Adapter(Qwen3VLAdapter):
    """`Qwen3VLAdapter` for `Qwen3_5ForConditionalGeneration` (Qwen3-VL's vision path, no DeepStack)."""

    family: ClassVar[str] = "qwen3_5"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3_5ForConditionalGeneration",)

    def _install(self) -> None:
        Qwen2_5_VLAdapter._install(self)  # its LLM takes no DeepStack inputs: nothing else to wrap

    def _prepare_llm(self, encoded, sets, kept, compact, shape) -> None:
        if any(getattr(output, "deepstack_features", None) for output in encoded):
            raise ValueError(f"{type(self.model).__name__}: its vision tower returned DeepStack features, which Qwen3.5 does not use")


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """`Qwen3VLAdapter` for `Qwen3VLMoeForConditionalGeneration` (Qwen3-VL-30B-A3B, 235B-A22B: the
    same vision path and DeepStack; the LLM's MoE layers are not touched by layer-0 pruning)."""

    family: ClassVar[str] = "qwen3_vl_moe"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLMoeForConditionalGeneration",)


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """`Qwen3_5Adapter` for `Qwen3_5MoeForConditionalGeneration` (Qwen3.5's MoE models)."""

    family: ClassVar[str] = "qwen3_5_moe"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3_5MoeForConditionalGeneration",)


__all__ = ["Qwen3VLAdapter", "Qwen3VLMoeAdapter", "Qwen3_5Adapter", "Qwen3_5MoeAdapter", "deepstack_of_kept"]
