"""VisionZip: dominant tokens by CLS attention, plus contextual tokens merged by key similarity.

Reference: S. Yang, Y. Chen, Z. Tian, C. Wang, J. Li, B. Yu, J. Jia, "VisionZip: Longer is Better
but Not Necessary in Vision Language Models", CVPR 2025 (public code `dvlab-research/VisionZip`,
read at commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02).

What the tower hands over, per crop (one CLIP forward), at the layer that PRODUCES LLaVA's
selected hidden state (`mm_vision_select_layer`, -2: layer 22 of CLIP-L's 24, the official
`attentions[-2]` / `layers[-2]`):

- `hidden`: (B, 1 + N, D) the selected hidden state WITH its CLS row (the official code hands the
  CLS row to the projector as a token);
- `q_cls`: (B, C) that layer's query projection of the CLS token (q_proj output, before scaling);
- `keys`: (B, 1 + N, C) that layer's key projections of every token;
- `num_heads`: the layer's attention heads H (C = H x hd).

The method, per crop, for a budget of K tokens (K = round(SUBSET_RATIO x N)):

1. Split: C_ctx = round(K x `contextual`) contextual tokens (at least 1), D = K - C_ctx dominant
   tokens, one of which is the CLS token (`split_budget`). The default fraction 10 / 64 is the
   official split at LLaVA-1.5's budgets: 54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192.
2. Dominant (`head_cls_attention`): per head h, softmax over the 1 + N keys of
   q_h . k_h / sqrt(hd); summed over heads (the official sum; its order is the head mean's); the
   D - 1 patches of highest score, plus the CLS token.
3. Contextual (`contextual_tokens`): the metric of a token is its key averaged over heads
   (B, 1 + N, hd), L2-normalised. The M = N - (D - 1) remaining patches, in ascending order,
   are split into C_ctx targets (positions 0, s, 2s, ... of the remaining list, s = max(1,
   M // C_ctx), the first C_ctx) and the others; each other token goes to its most similar
   target (cosine of metrics; ties: the first target); contextual token t = x_t + mean of the
   hidden states assigned to it (x_t alone when none is).
4. Output, in the official order: CLS, the dominant patches ascending, the contextual tokens in
   target order. `sources`: the patch each row stands for (`CLS` for the CLS row).

Differences from the official code, deliberate:

- Budget from `SUBSET_RATIO`: K = round(ratio N), split by the fraction above (`VISIONZIP_CONTEXTUAL`);
  the official code takes the two counts as arguments (`dominant`, `contextual`); at 64 / 128 /
  192 of 576 the counts are the same.
- The layer: the official code hard-codes `hidden_states[-2]` / `attentions[-2]` / `layers[-2]`;
  ours follows the model's `mm_vision_select_layer` (-2 for LLaVA-1.5 / 1.6: the same layers).
- Arithmetic in fp32 (fp64 for fp64 input); the official code runs in the tower's dtype (fp16
  on GPU); the CLS scores are one einsum instead of its batched matmul, so exact (fp32) near-ties
  at the top-k cut may break differently. The metric's normalisation guards a zero key (F.normalize, eps 1e-12) where the
  official code would divide by zero.
- LLaVA-1.6 (anyres): each crop is merged on its own and an image's tokens are its crops' merged
  tokens, base first, then the grid crops in order (as our PruMerge). The official code puts the
  grid crops' dominant patches back on the grid (raster order over the whole grid, no unpadding,
  no newline tokens), then the grid crops' CLS rows, then their contextual tokens.
- The token order is always the official one (`OTPRUNE_ORDER` does not apply).

Towers without a CLS token (SigLIP, Qwen2.5-VL's ViT) have no CLS attention: the model glue
refuses them (`NoClsTokenError`, as PruMerge).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from otprune.methods.base import TokenMerger, param
from otprune.methods.prumerge import ADAPTIVE, MergeResult

CLS = -3  # the source index of the CLS row (not a patch)
DEFAULT_CONTEXTUAL = 10 / 64  # the official split at LLaVA-1.5's budgets (54 + 10 of 64)


# ------------------------------------------------------------------ pure functions
def split_budget(k: int, contextual: float) -> tuple[int, int]:
    """K tokens -> (dominant count including the CLS token, contextual count): contextual =
    max(1, round(K x fraction)), dominant = K - contextual >= 1. K must be >= 2."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"VisionZip budget K={k!r}: must be an integer >= 2 (the CLS token and one contextual token)")
    ctx = min(k - 1, max(1, round(k * contextual)))
    return k - ctx, ctx


def producing_layer(select_layer: int, num_layers: int) -> int:
    """The index of the encoder layer whose OUTPUT is hidden state `select_layer` (of num_layers + 1)."""
    index = select_layer % (num_layers + 1)
    if index == 0:
        raise ValueError(
            f"mm_vision_select_layer={select_layer}: VisionZip reads the attention of the layer producing the selected "
            "hidden state; the embeddings (hidden state 0) are produced by none"
        )
    return index - 1


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., C) -> (..., H, hd)."""
    if x.shape[-1] % num_heads:
        raise ValueError(f"num_heads={num_heads}: must divide the projection width {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def head_cls_attention(q_cls: Tensor, keys: Tensor, num_heads: int) -> Tensor:
    """q_cls: (B, C), keys: (B, 1 + N, C) -> (B, N): per head the CLS row's softmax over all 1 + N
    keys of q_h . k_h / sqrt(hd), summed over the H heads; the patch entries."""
    if q_cls.dim() != 2 or keys.dim() != 3 or keys.shape[0] != q_cls.shape[0] or keys.shape[2] != q_cls.shape[1]:
        raise ValueError(f"head_cls_attention: q_cls (B, C) and keys (B, 1 + N, C), got {tuple(q_cls.shape)} and {tuple(keys.shape)}")
    dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
    q = _split_heads(q_cls.detach().to(dtype), num_heads)  # (B, H, hd)
    k = _split_heads(keys.detach().to(dtype), num_heads)  # (B, T, H, hd)
    logits = torch.einsum("bhd,bthd->bht", q * q.shape[-1] ** -0.5, k)  # (B, H, 1 + N)
    return logits.softmax(dim=-1)[:, :, 1:].sum(dim=1)


def head_mean_keys(keys: Tensor, num_heads: int) -> Tensor:
    """keys: (B, T, C) -> (B, T, hd), the key averaged over the heads (VisionZip's metric)."""
    return _split_heads(keys, num_heads).mean(dim=-2)


def contextual_tokens(hidden: Tensor, metric: Tensor, rest: Tensor, ctx: int) -> tuple[Tensor, Tensor]:
    """The contextual merge. hidden: (B, T, D), metric: (B, T, hd), rest: (B, M) the rows not kept as
    dominant, ascending; ctx <= M -> (tokens (B, ctx, D), target rows (B, ctx))."""
    m = rest.shape[1]
    if ctx > m:
        raise ValueError(f"contextual count {ctx}: more than the {m} remaining tokens")
    step = max(1, m // ctx)
    slots = torch.arange(0, m, step, device=rest.device)[:ctx]  # (ctx,) positions in the rest list
    is_target = torch.zeros(m, dtype=torch.bool, device=rest.device)
    is_target[slots] = True
    targets = rest[:, slots]  # (B, ctx)
    others = rest[:, ~is_target]  # (B, M - ctx)
    unit = F.normalize(metric, dim=-1)
    gather = lambda x, rows: torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    sim = torch.bmm(gather(unit, others), gather(unit, targets).transpose(1, 2))  # (B, M - ctx, ctx)
    assign = F.one_hot(sim.argmax(dim=2), ctx).to(hidden.dtype) if others.shape[1] else sim.new_zeros(sim.shape)
    counts = assign.sum(dim=1).clamp_min(1)[..., None]  # (B, ctx, 1)
    mean = torch.bmm(assign.transpose(1, 2), gather(hidden, others)) / counts  # (B, ctx, D)
    return gather(hidden, targets) + mean, targets


def visionzip(hidden: Tensor, q_cls: Tensor, keys: Tensor, num_heads: int, k: int,
              contextual: float = DEFAULT_CONTEXTUAL) -> tuple[Tensor, Tensor]:
    """VisionZip of B crops. hidden: (B, 1 + N, D) with the CLS row first; q_cls: (B, C); keys:
    (B, 1 + N, C); k: tokens per crop -> (tokens (B, k, D), sources (B, k) long: patch index,
    `CLS` for the CLS row), in the official order (see the module docstring)."""
    if hidden.dim() != 3 or keys.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"hidden (B, 1 + N, D) and keys (B, 1 + N, C) must agree, got {tuple(hidden.shape)} and {tuple(keys.shape)}")
    n = hidden.shape[1] - 1
    if k > n:
        raise ValueError(f"VisionZip budget K={k}: more than the crop's {n} patches")
    dominant, ctx = split_budget(k, contextual)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.detach().to(dtype)
    scores = head_cls_attention(q_cls, keys, num_heads)  # (B, N)
    top = scores.topk(dominant - 1, dim=1).indices + 1  # (B, D - 1) rows (CLS is row 0)
    keep = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    keep[:, 0] = True
    keep.scatter_(1, top, True)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept rows first, each part ascending
    kept_rows, rest = order[:, :dominant], order[:, dominant:]
    metric = head_mean_keys(keys.detach().to(dtype), num_heads)
    merged, targets = contextual_tokens(x, metric, rest, ctx)
    dom = torch.gather(x, 1, kept_rows[..., None].expand(-1, -1, x.shape[-1]))
    sources = torch.cat([kept_rows, targets], dim=1) - 1  # patch index; the CLS row -> -1
    sources = sources.masked_fill(sources < 0, CLS)
    return torch.cat([dom, merged], dim=1), sources


@dataclasses.dataclass
class VisionZip(TokenMerger):
    """VisionZip (see the module docstring): CLS + dominant patches by CLS attention, plus
    contextual tokens merged by key similarity, at the layer producing the selected hidden state."""

    name: ClassVar[str] = "visionzip"
    display_name: ClassVar[str] = "VisionZip"
    table_rank: ClassVar[int] = 220
    default_ratio: ClassVar[object] = None  # needs SUBSET_RATIO (no adaptive budget)
    tower_layer: ClassVar[str] = "producing"  # the tower layer whose attention it reads
    needs_cls_row: ClassVar[bool] = True  # takes the selected hidden state with its CLS row

    contextual: float = param(DEFAULT_CONTEXTUAL, env="VISIONZIP_CONTEXTUAL", tag="ctx", label="contextual",
                              doc="fraction of the budget given to contextual tokens, in (0, 1); official 10/64")

    def __post_init__(self) -> None:
        if isinstance(self.contextual, bool) or not isinstance(self.contextual, (int, float)) or not 0.0 < self.contextual < 1.0:
            raise ValueError(f"contextual={self.contextual!r}: must be a number in (0, 1) (official 10/64 = 0.15625)")

    def budget(self, n: int, ratio: float) -> int:
        """Tokens per crop of n patches: round(ratio n), at least 2."""
        if ratio == ADAPTIVE or isinstance(ratio, str):
            raise ValueError(f"SUBSET_RATIO={ratio!r}: VisionZip has no adaptive budget; give a number in (0, 1]")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio={ratio!r}: must be a number in (0, 1]")
        return min(n, max(2, round(float(ratio) * n)))

    def merge_tower(self, hidden: Tensor, q_cls: Tensor, keys: Tensor, num_heads: int, ratio: float) -> MergeResult:
        """hidden: (B, 1 + N, D) with CLS; q_cls: (B, C); keys: (B, 1 + N, C) of the producing layer."""
        k = self.budget(hidden.shape[1] - 1, ratio)
        tokens, sources = visionzip(hidden, q_cls, keys, num_heads, k, self.contextual)
        counts = torch.full((hidden.shape[0],), k, dtype=torch.long, device=tokens.device)
        return MergeResult(tokens, sources, counts, counts)

    def merge(self, features, q_cls, keys, ratio, order: str = "ascending"):
        raise ValueError("VisionZip reads the tower's selected hidden state with its CLS row and the heads of the "
                         "layer producing it: call merge_tower(hidden, q_cls, keys, num_heads, ratio)")
