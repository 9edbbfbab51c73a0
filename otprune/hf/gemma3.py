"""OTPrune on transformers' own, unmodified `Gemma3ForConditionalGeneration` (layer 0).

    from otprune import hf
    adapter = hf.apply(model, otprune.PruneConfig(method="otprune", layer=0, ratio=0.25))
    out = model.generate(**processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                         return_tensors="pt", add_generation_prompt=True))

Gemma 3 writes each image's `mm_tokens_per_image` tokens (SigLIP, average-pooled and projected:
256 for the released models) into the `<image_soft_token>` placeholders between
`<start_of_image>` and `<end_of_image>`, and its LLM lets the tokens of one image attend to each
other in both directions: the processor's `token_type_ids` (1 on image placeholders) give the
blocks (a run of consecutive image rows is one block), every other pair is causal.

The adapter is the LLaVA family's (`otprune.hf.llava.LlavaFamilyAdapter`: it wraps the inner
model's `forward` on the instance, ONE batched selection for every image of a batch, K_i =
round(ratio * T_i) kept per image, the pruned placeholder rows leave the sequence, text rows
never do, positions 0..n'_b - 1 on the compact sequence, decoding continues on the pruned cache).
Gemma 3's part: its `token_type_ids` follow the kept rows, so each image's bidirectional block is
exactly its kept tokens (the dropped ones are gone from both sides of the mask). Each image is
one token set; with pan-and-scan every crop comes with its own `<start_of_image>` block and is
its own token set. SigLIP has no CLS token: PruMerge / PruMerge+ / `SUBSET_RATIO=iqr` are refused.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from otprune.hf.llava import LlavaFamilyAdapter


class Gemma3Adapter(LlavaFamilyAdapter):
    """`Gemma3ForConditionalGeneration`: one token set per image (per crop with pan-and-scan)."""

    family: ClassVar[str] = "gemma3"
    model_classes: ClassVar[tuple[str, ...]] = ("Gemma3ForConditionalGeneration",)
    row_inputs: ClassVar[tuple[str, ...]] = ("token_type_ids",)

    def visual_sets(self, inner, kwargs: dict) -> list[tuple[int, list[Tensor]]]:
        encoded = self._encoded(kwargs, "image")
        if encoded is None and kwargs.get("pixel_values") is not None:
            encoded = inner.get_image_features(kwargs["pixel_values"], return_dict=True)
        if encoded is None:
            return []
        return [(int(inner.config.image_token_id), list(encoded.pooler_output.unbind(0)))]  # per image (T, D)


__all__ = ["Gemma3Adapter"]
