"""DART: duplication-aware token reduction inside the LLM.

Reference: Z. Wen, Y. Gao, S. Wang, J. Zhang, Q. Zhang, W. Li, C. He, L. Zhang, "Stop Looking for
Important Tokens in Multimodal Language Models: Duplication Matters More", 2025 (arXiv
2502.11494; public code `ZichenWen1/DART`, read in its copy `xqy1111111/DART`:
`llava/model/language_model/modeling_llama_self.py` at commit
9fee9fa199d591cf91891ad468ab52c754de9bf5 (`DART.get_retained_image_token`, and its patched
`LlamaAttention`, which hands the layer's keys after the rotary embedding to the pruning step),
`llava/eval/model_vqa_loader.py` at 0247657060a42dd329d6f273455bfad05d5b2c74 (defaults: layer 2,
4 + 4 pivots, `max_num_trunction` 128); the original repository itself was not available to us).

At decoder layer L (`LAYER_INDEX`, default 2) each image keeps, of its V visual tokens:

1. Pivots (`pivots`): the `DART_PIVOTS_IMAGE` (4) image tokens, and the `DART_PIVOTS_TEXT` (4)
   text tokens after the image, whose KEY in layer L-1 has the largest L1 norm (keys of all heads
   concatenated, after the rotary embedding: what the layer attends with).
2. Per pivot p, in turn, the P = floor(K / (pivots_image + pivots_text)) image tokens, among
   those not yet taken and not an image pivot, LEAST cosine-similar to p (`dart_keep`), the
   similarity of the hidden states entering layer L after the model's final norm; they are
   taken (so no later pivot takes them).
3. Kept: the image pivots and every token taken in step 2; the text pivots stay as all text does.
   With K = round(SUBSET_RATIO x V) the kept count is pivots_image + P x (pivots_image +
   pivots_text), at most V (`kept_count`): the official code's count (132 for K = 128 at 4 + 4
   pivots, its `max_num_trunction`).

The pivots are processed in the iteration order of the Python set of their positions in the
sample's sequence (image pivots first, then text pivots, as the official code builds it): the
result depends on that order when two pivots' least similar tokens overlap. Finding that order
reads each image's 8 pivot positions on the host, once per image.

Differences from the official code, deliberate:

- Budget from `SUBSET_RATIO` (K = round(ratio V), the official `max_num_trunction`); LLaVA-1.6's
  separate `retain_token_num_for_llava_next` is not used: every model takes K from the ratio.
- The keys: layer L-1's key projections after the rotary embedding, as the official patched
  attention returns them, recomputed from that layer's input; grouped-query heads are not
  repeated (the official code repeats them, which scales every L1 norm by the group size: the
  same pivots). An older copy of the file (0247657) reshapes the keys with the head count
  instead of the token count, which cannot run on (B, H, T, hd) keys; we follow 9fee9fa.
- Batches and several images per prompt: each image is pruned on its own, its text pivots among
  the text tokens after it (other images excluded); the official code handles one image at
  batch 1 at a fixed start position (35, LLaVA-1.5's system prompt).
- Fewer text tokens after an image than `DART_PIVOTS_TEXT`: an error (the official code fails too).
- When the candidates run out, a pivot takes what is left (the official top-k would fail).
- Cosine similarity in fp32 with each norm clamped at 1e-8 (torch's cosine_similarity), on the
  model's dtype in the official code; exact ties may break differently.

No before-LLM variant: the paper's pivots are keys of an LLM layer (its ablations at other layers
stay inside the LLM), so `LAYER_INDEX=0` is refused.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from otprune.methods.base import param
from otprune.methods.in_llm import InLLMRule


def kept_count(v: int, k: int, pivots_image: int, pivots_text: int) -> int:
    """Tokens an image of v tokens keeps for a budget of k: pivots_image + P (pivots_image +
    pivots_text), P = k // (pivots_image + pivots_text), at most v (and at least min(pivots_image, v))."""
    per_pivot = k // (pivots_image + pivots_text)
    return min(v, pivots_image + per_pivot * (pivots_image + pivots_text))


def pivot_order(image_pivots: list[int], text_pivots: list[int], start: int, v: int) -> list[tuple[str, int]]:
    """The official processing order of the pivots: the iteration order of the Python set of their
    sequence positions (image pivot i at start + i, text pivot j at start + v + j), image pivots
    inserted first. -> [("image" | "text", local index), ...]."""
    where = {start + i: ("image", i) for i in image_pivots}
    where.update({start + v + j: ("text", j) for j in text_pivots})
    return [where[pos] for pos in set([start + i for i in image_pivots] + [start + v + j for j in text_pivots])]


def _cosine(row: Tensor, rows: Tensor, eps: float = 1e-8) -> Tensor:
    """row: (D,), rows: (M, D) -> (M,) cosine similarities, each norm clamped at eps."""
    dot = rows @ row
    return dot / (torch.linalg.vector_norm(rows, dim=-1).clamp_min(eps) * torch.linalg.vector_norm(row).clamp_min(eps))


def dart_keep(image_keys: Tensor, image_states: Tensor, text_keys: Tensor, text_states: Tensor, k: int,
              pivots_image: int = 4, pivots_text: int = 4, start: int = 0) -> Tensor:
    """DART for ONE image.

    Args:
        image_keys: (V, C) the image tokens' keys in layer L-1; text_keys: (T, C) those of the text
            tokens after the image.
        image_states, text_states: (V, D), (T, D) the normed hidden states entering layer L.
        k: the budget (see `kept_count`).
        start: the image's first position in its sample's sequence (for the official pivot order).

    Returns:
        (kept_count,) long, the kept image tokens, ascending.
    """
    v, t = image_keys.shape[0], text_keys.shape[0]
    if t < pivots_text:
        raise ValueError(f"DART: {t} text token(s) after the image, fewer than DART_PIVOTS_TEXT={pivots_text}")
    n_img = min(pivots_image, v)
    img_piv = torch.linalg.vector_norm(image_keys.float(), ord=1, dim=-1).topk(n_img).indices
    txt_piv = torch.linalg.vector_norm(text_keys.float(), ord=1, dim=-1).topk(pivots_text).indices
    per_pivot = k // (pivots_image + pivots_text)
    states = {"image": image_states.float(), "text": text_states.float()}
    free = torch.ones(v, dtype=torch.bool, device=image_keys.device)
    free[img_piv] = False
    taken = [img_piv]
    remaining = v - n_img  # free candidates, counted on the host (no device read in the loop)
    for kind, j in pivot_order(img_piv.tolist(), txt_piv.tolist(), start, v):  # one host read: the pivots
        take = min(per_pivot, remaining)
        if take == 0:
            continue
        far = (-_cosine(states[kind][j], states["image"])).masked_fill(~free, float("-inf"))  # (V,)
        picked = far.topk(take).indices
        free[picked] = False
        taken.append(picked)
        remaining -= take
    return torch.cat(taken).sort().values


@dataclasses.dataclass
class DART(InLLMRule):
    """DART (see the module docstring): pivots by key L1 norm, then per pivot its least similar tokens."""

    name: ClassVar[str] = "dart"
    display_name: ClassVar[str] = "DART"
    table_rank: ClassVar[int] = 25
    default_layer: ClassVar[int | None] = 2
    own_schedule: ClassVar[bool] = True  # kept count: `kept_count`, not round(ratio V)
    acts: ClassVar[str] = "picks pivots by the keys of layer L-1 and drops the tokens duplicating them"

    pivots_image: int = param(4, env="DART_PIVOTS_IMAGE", tag="pi", label="image pivots", kind=int,
                              doc="image pivot tokens, >= 1 (official 4)")
    pivots_text: int = param(4, env="DART_PIVOTS_TEXT", tag="pt", label="text pivots", kind=int,
                             doc="text pivot tokens, >= 0 (official 4)")

    def __post_init__(self) -> None:
        for name, low in (("pivots_image", 1), ("pivots_text", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")

    def schedule(self, config, tokens: int, num_layers: int) -> list[int]:
        kept = kept_count(tokens, round(config.ratio * tokens), self.pivots_image, self.pivots_text)
        return [tokens] * config.layer + [kept] * (num_layers - config.layer)

    def keep(self, ctx) -> Tensor:
        """(I, K_max) kept indices per image, ascending, -1 padded (needs `ctx.dart_inputs()`)."""
        keys, states, text_keys, text_states, text_lengths, starts = ctx.dart_inputs()
        n_images = len(ctx.lengths)
        k_max = max(ctx.keep, default=0)
        out = torch.full((n_images, k_max), -1, dtype=torch.long, device=keys.device)
        for i in range(n_images):
            v, t = ctx.lengths[i], text_lengths[i]
            budget = round(ctx.config.ratio * v)
            kept = dart_keep(keys[i, :v], states[i, :v], text_keys[i, :t], text_states[i, :t], budget,
                             self.pivots_image, self.pivots_text, starts[i])
            if kept.numel() != ctx.keep[i]:
                raise RuntimeError(f"DART kept {kept.numel()} tokens of image {i}, its schedule says {ctx.keep[i]}")
            out[i, : kept.numel()] = kept
        return out
