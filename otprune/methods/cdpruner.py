"""CDPruner: conditional DPP on the visual tokens, the kernel scaled by relevance to the instruction.

Reference: Q. Zhang, M. Liu, L. Li, M. Lu, Y. Zhang, J. Pan, Q. She, S. Zhang, "Beyond Attention or
Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025 (public
code `Theia-4869/CDPruner`, read at commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864:
`llava/model/llava_arch.py` `encode_images`, `llava/model/multimodal_encoder/clip_encoder.py`).

Per image of N projected visual tokens x_i (what the LLM would get), keeping K:

1. Similarity S_ij = cos(x_i, x_j) of the projected tokens.
2. Relevance (`relevance_scores`), as the official code computes it for LLaVA: the instruction
   (the question, without LLaVA's "Answer the question using a single word or phrase." suffix)
   goes through the CLIP text tower paired with the vision tower (`CLIPTextModelWithProjection` of
   the same checkpoint; 77-token segments, zero padded, one embedding t_m per segment); each patch
   of the selected hidden state goes through the vision tower's `post_layernorm` and
   `visual_projection` (e_i); the text tower and the projection run in fp32 (the official code
   loads them in transformers' default dtype), `post_layernorm` in the tower's dtype. Then r_i = -mean_m cos(e_i, t_m) (the NEGATED similarity, as the
   code does), min-max normalised: r = (r - min r + 1e-6) / (max r - min r).
   With `CDPRUNER_THETA` = theta in (0, 1), r is replaced by exp(theta / (2 (1 - theta)) r), the
   paper's weighting (commented out in the official code; theta = 0, the default, is the
   official code's active path: r as above).
3. Kernel L = diag(r) S diag(r); greedy MAP of log det L[A, A] (Chen et al. 2018's fast greedy:
   each step the candidate of largest Cholesky residual), K steps; ties to the lowest index.
4. The kept tokens go to the LLM in ascending order.

`CDPruner.relevance`: (B, N) the relevance of each image's tokens (step 2, computed by the model
glue, which applies `theta` there: the selector takes the relevance as given). Without it (`otprune.select_tokens(x, r, "cdpruner")` alone) every r_i = 1: the
unconditional DPP on S, which is what CDPruner does for an instruction equally relevant to all tokens.

Differences from the official code, deliberate:

- Min-max per image, over all its crops at once; the official code normalises over its whole
  batch of crops (the same for one image per batch, as its evaluation runs).
- LLaVA-1.6 (anyres, our llava): the official code runs the greedy per crop (each crop, the base
  image and every grid crop, keeping `visual_token_num` tokens), then lays the kept tokens out
  (unpadding may drop some) and keeps every `image_newline` token. Ours selects once on the
  image's laid-out token set (base crop, unpadded grid, newline tokens), as every other method
  does there, with K = round(ratio x its tokens): each token's relevance is its CLIP patch's
  (laid out like the tokens, `LlavaMetaForCausalLM.instructed_image_features`), and a newline
  token, which has no patch, gets relevance 1 (the top of the min-max scale; then weighted by
  theta like the others): it competes for a slot instead of being kept unconditionally.
- Once no candidate has a positive residual (the kernel's rank is used up), the remaining slots
  take the unpicked tokens in ascending order; the official loop would take the square root of a
  non-positive residual.
- S has an exact unit diagonal (a zero token's row is zero) and is computed in fp32 (fp64 for
  fp64 input) after a power-of-two rescaling of each token (`cosine_similarity`); the official
  code normalises in the model's dtype, then computes in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from otprune.methods._greedy import greedy_logdet
from otprune.methods.base import TokenSelector, mask_beyond_k, param, valid_mask
from otprune.methods.divprune import cosine_similarity

QUESTION_SUFFIX = "\nAnswer the question using a single word or phrase."  # removed from the instruction


def instruction_text(question: str) -> str:
    """The text CDPruner's official LLaVA evaluation scores the tokens against: the question
    without LLaVA's short-answer suffix."""
    return question.replace(QUESTION_SUFFIX, "")


# the assistant's tag that ends a chat prompt (vicuna_v1 / llava_v1, llama_2 / mistral, chatml), removed from
# an instruction read off a prompt
ASSISTANT_TAGS = ("ASSISTANT:", "Assistant:", "[/INST]", "<|im_start|>assistant")


def prompt_instruction(tail: str) -> str:
    """The instruction of a prompt whose text after its (last) image, decoded without special tokens,
    is `tail`: up to the chat template's first assistant tag (`ASSISTANT_TAGS`; what follows it, e.g.
    the continuation a log-likelihood request scores, is not part of the question), stripped, then
    `instruction_text` (the short-answer suffix removed). For LLaVA's "USER: <image>\\n{question}
    ASSISTANT:" this is the question, what the official evaluation passes."""
    cut = min((i for i in (tail.find(tag) for tag in ASSISTANT_TAGS) if i >= 0), default=len(tail))
    return instruction_text(tail[:cut].strip())


def relevance_scores(image_embeds: Tensor, text_embeds: Tensor, theta: float = 0.0) -> Tensor:
    """image_embeds: (N, C) the patches in CLIP's joint space, text_embeds: (M, C) the instruction's
    segment embeddings -> (N,) the relevance r (see the module docstring, step 2). fp32 (fp64 in)."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"relevance_scores: image_embeds (N, C) and text_embeds (M, C), got "
                         f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    dtype = torch.float64 if image_embeds.dtype == torch.float64 else torch.float32
    img = image_embeds.to(dtype)
    txt = text_embeds.to(dtype)
    img = img / torch.linalg.vector_norm(img, dim=-1, keepdim=True)
    txt = txt / torch.linalg.vector_norm(txt, dim=-1, keepdim=True)
    r = -(img @ txt.T).mean(dim=-1)  # (N,)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    return weighted_relevance(r, theta)


def weighted_relevance(relevance: Tensor, theta: float) -> Tensor:
    """The min-max relevance r as the kernel uses it: r itself at theta = 0 (the official code's
    active path), exp(theta / (2 (1 - theta)) r) for theta in (0, 1) (the paper's weighting)."""
    if not theta:
        return relevance
    return torch.exp(theta / (2 * (1 - theta)) * relevance)


def conditional_kernel(features: Tensor, relevance: Tensor | None) -> Tensor:
    """features: (B, N, D), relevance: (B, N) or None (all 1) -> (B, N, N) L = diag(r) S diag(r)."""
    sim = cosine_similarity(features)
    if relevance is None:
        return sim
    r = relevance.to(sim.dtype)
    return r[:, :, None] * sim * r[:, None, :]


@dataclasses.dataclass
class CDPruner(TokenSelector):
    """CDPruner (see the module docstring): greedy MAP of the conditional DPP diag(r) S diag(r)."""

    name: ClassVar[str] = "cdpruner"
    display_name: ClassVar[str] = "CDPruner"
    table_rank: ClassVar[int] = 85
    needs_instruction: ClassVar[bool] = True  # the model glue computes `relevance` from the prompt

    theta: float = param(0.0, env="CDPRUNER_THETA", tag="th", label="θ",
                         doc="relevance weight: 0 = the official code's linear relevance, in (0, 1) = exp(θ/(2(1-θ)) r)")
    relevance: Tensor | None = None  # (B, N) per image its tokens' relevance, or None (all 1)

    def __post_init__(self) -> None:
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0.0 <= self.theta < 1.0 \
                or math.isnan(self.theta):
            raise ValueError(f"theta={self.theta!r}: must be a number in [0, 1) (0: the official linear relevance)")
        if self.relevance is not None and (not isinstance(self.relevance, Tensor) or self.relevance.dim() != 2):
            raise ValueError("relevance: must be a (B, N) tensor, one row of token relevances per image")

    def for_sample(self, b: int) -> CDPruner:
        """This selector for sample b of the batch alone (its relevance row)."""
        if self.relevance is None:
            return self
        return dataclasses.replace(self, relevance=self.relevance[b : b + 1])

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        relevance = None
        if self.relevance is not None:
            if self.relevance.shape[0] != features.shape[0] or self.relevance.shape[1] < features.shape[1]:
                raise ValueError(f"relevance: shape {tuple(self.relevance.shape)} does not cover features "
                                 f"{tuple(features.shape[:2])}; give one relevance per token of each image")
            relevance = self.relevance[:, : features.shape[1]].to(device=features.device, dtype=features.dtype)
            if not bool(torch.isfinite(relevance).all()) or bool((relevance < 0).any()):
                raise ValueError("relevance: must be finite and >= 0")
        kernel = conditional_kernel(features, relevance)  # (B, N, N)
        valid = valid_mask(lengths, kernel.shape[-1])
        return mask_beyond_k(greedy_logdet(kernel, valid, k_max, eps=0.0), k)  # slots beyond k[b]: -1
