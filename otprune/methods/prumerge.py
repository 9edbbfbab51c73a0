"""PruMerge and PruMerge+: adaptive prune-and-merge inside the CLIP tower.

Reference: Y. Shang, M. Cai, B. Xu, Y. J. Lee, Y. Yan, "LLaVA-PruMerge: Adaptive Token Reduction
for Efficient Large Multimodal Models", ICCV 2025 (public code `42Shawn/LLaVA-PruMerge`).

What the tower hands over, per crop (one CLIP forward of one image or one anyres crop), at the
layer that consumes LLaVA's selected hidden state (`mm_vision_select_layer`, -2: the tower's last
layer, whose input is the second to last hidden state):

- `q_cls`: (B, C) that layer's query projection of the CLS token (q_proj output, bias included,
  before the attention's own scaling);
- `keys`: (B, 1 + N, C) that layer's key projections of the CLS token and the N patches;
- `features`: (B, N, C) the selected hidden state without the CLS row (what the projector gets).

The method, per crop:

1. CLS attention (`cls_attention`): softmax over the 1 + N keys of q_cls . k / sqrt(C), taken
   over the FULL projection width C at once (one "head" of width C, not per head, as the official
   code does); the N patch entries are the scores (the CLS's own entry is dropped, not renormalised).
2. Budget (`iqr_outliers`): the patches whose score is above Q3 + 1.5 IQR (strictly), with the
   quartiles of THIS crop's N scores, linear interpolation (numpy's default percentile).
   K = their count. With a fixed ratio r (`SUBSET_RATIO`) instead, each image hands the LLM at
   most round(r T) tokens in total, the summary token and PruMerge+'s samples included
   (`crop_totals`, `fixed_budget`): PruMerge keeps K = round(r N) - 1 patches and the summary
   (no summary when the total is 1), PruMerge+ the largest K whose picks and samples fit
   (refused when not even K = 1 fits); at r = 1 nothing is dropped and nothing merged: the
   unpruned tokens, no summary.
3. Kept: the K highest scores (for the IQR budget these are exactly the outliers).
   PruMerge+ (`uniform_additions`) adds the patches of an arithmetic sequence
   0, s, 2s, ... < N - 1 with s = floor(floor(1 / (K / N)) / 3) (at least 1), those not kept yet.
4. Merge (`merge_kept`): each kept patch i becomes x_i + sum_j a_j x_j over its `knn` other
   patches j (kept or not) with the largest cosine similarity of keys, a_j the CLS attention;
   the weights are not normalised. With `summary`, one more token sum_j a_j x_j over the dropped
   patches is appended last.

Differences from the official code (`token_prune_merge_advanced[_plus]`), deliberate:

- IQR per crop: the official code flattens the whole batch's scores before taking quartiles,
  so an image's K depends on the other images of its batch; ours is per crop, so a batch gives
  the same K and tokens as each image alone.
- No outlier (K = 0): the official PruMerge keeps no patch and hands the LLM only the summary
  token; the official PruMerge+ raises ZeroDivisionError (its stride is int(1 / (K / N))). Ours
  keeps the single highest-scoring patch (K >= 1), so a kept set is never empty.
- Official code hooks layer 23 (CLIP-L's last); ours hooks the layer consuming
  `mm_vision_select_layer` of the model at hand (the same layer for LLaVA-1.5 / 1.6).
- PruMerge+ with s = 0 (K > N / 3) would fail in the official code; ours uses s >= 1. Its stop
  N - 1 (575 for N = 576) is kept, so the last patch is never a uniform sample.
- A fixed ratio r hands the LLM at most round(r T) tokens per image in total (above). The official
  non-adaptive path (`if_adaptive=False`, written for training) keeps the int(N r) top patches
  plus the summary (int(N r) + 1 tokens); its PruMerge+ adds the sequence int(s / 2), int(s / 2)
  + s, ... < 575 with s = int(1 / r), without removing duplicates, written into a tensor of
  2 int(N r) columns (an error unless the sequence has exactly int(N r) entries). Ours keeps the
  adaptive path's deduplicated sequence, with K chosen to fit the total.
- The merge's k: 32 (the official inference code; its training variant uses 16): `PRUMERGE_KNN`.
- Arithmetic in fp32 (the official code runs in the tower's dtype, fp16 on GPU); exact ties
  of cosine similarity may break differently.

DivPrune's repository (`vbdi/divprune`, `LLaVA/llava/model/multimodal_encoder/clip_encoder.py`)
carries the official two functions, switched by `BASELINE=PRUMERGE` with `TYPE=PLUS` (PruMerge+;
any other `TYPE` PruMerge; `TYPE` unset is a KeyError) and `NOT_ADAPTIVE=<r>` (the non-adaptive
path above; unset: the adaptive one). Its adaptive PruMerge+ catches the error of a batch of
several images (one sample sequence for the whole batch cannot be concatenated to every row) and
then hands the LLM the unpruned patches. Here `TYPE` and `NOT_ADAPTIVE` are refused with an error
naming `BASELINE=PRUMERGE_PLUS` / `SUBSET_RATIO=<r>` (`otprune.config`), never ignored.

Order handed to the LLM: "ascending" (default) sorts the kept patches by index, summary last;
"official" is the official order: kept patches by descending score, PruMerge+'s samples after
them in ascending order, summary last.

Towers without a CLS token (SigLIP, Qwen2.5-VL's ViT) have no CLS attention: the model glue
refuses them (`NoClsTokenError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otprune.methods.base import TokenMerger, param

SUMMARY = -2  # the source index of the appended summary token (not a patch)
ADAPTIVE = "iqr"  # the ratio value that asks for PruMerge's per-image IQR budget


class NoClsTokenError(ValueError):
    """The method needs a vision tower with a CLS token."""


def no_cls_error(method: str, tower: str) -> NoClsTokenError:
    return NoClsTokenError(
        f"BASELINE={method!r} (or SUBSET_RATIO={ADAPTIVE!r}): needs the CLS token's attention to the patches, but the "
        f"vision tower {tower} has no CLS token; use it with CLIP towers (LLaVA-1.5, LLaVA-1.6) or pick a fixed "
        "SUBSET_RATIO and a selection method"
    )


# ------------------------------------------------------------------ pure functions
def cls_attention(q_cls: Tensor, keys: Tensor) -> Tensor:
    """q_cls: (B, C), keys: (B, 1 + N, C) (CLS key first) -> (B, N) the CLS token's attention to each
    patch: softmax over all 1 + N keys of q . k / sqrt(C), full width C (one head), patch part. fp32."""
    if q_cls.dim() != 2 or keys.dim() != 3 or keys.shape[0] != q_cls.shape[0] or keys.shape[2] != q_cls.shape[1]:
        raise ValueError(f"cls_attention: q_cls (B, C) and keys (B, 1 + N, C), got {tuple(q_cls.shape)} and {tuple(keys.shape)}")
    q = q_cls.detach().float()
    k = keys.detach().float()
    logits = torch.bmm(k, q[:, :, None])[..., 0] * q.shape[1] ** -0.5  # (B, 1 + N)
    return logits.softmax(dim=-1)[:, 1:]


def iqr_outliers(scores: Tensor) -> Tensor:
    """scores: (B, N) -> (B, N) bool: score > Q3 + 1.5 (Q3 - Q1), quartiles per row (linear
    interpolation, numpy's default percentile), computed in fp64."""
    s = scores.double()
    quart = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device), dim=1)  # (2, B)
    bound = quart[1] + 1.5 * (quart[1] - quart[0])  # (B,)
    return s > bound[:, None]


def iqr_keep_count(scores: Tensor) -> Tensor:
    """scores: (B, N) -> (B,) long: PruMerge's adaptive budget per row, the IQR outlier count,
    at least 1 (a row without outliers keeps its best patch)."""
    return iqr_outliers(scores).sum(dim=1).clamp_min(1)


def budget(scores: Tensor, ratio: float | str) -> Tensor:
    """(B,) long tokens to keep per row: the IQR count for ratio "iqr", else round(ratio N) >= 1."""
    if ratio == ADAPTIVE:
        return iqr_keep_count(scores)
    n = scores.shape[1]
    return torch.full((scores.shape[0],), max(1, round(float(ratio) * n)), dtype=torch.long, device=scores.device)


def crop_totals(ratio: float, tokens: list[int], crops: list[int], patches: int) -> list[int]:
    """A fixed ratio's token totals per crop: image i (`tokens[i]` visual tokens unpruned, split in
    `crops[i]` CLIP crops of `patches` patches each) hands the LLM M_i = max(1, round(ratio *
    tokens[i])) tokens in total (at most its crops' patches), summary tokens and PruMerge+'s
    samples included; M_i is split over its crops as evenly as possible (the first M_i mod P_i
    crops one more). ValueError when M_i < P_i (every crop keeps at least one token)."""
    check_ratio(ratio)
    totals = []
    for i, (t, p) in enumerate(zip(tokens, crops, strict=True)):
        m = min(max(1, round(float(ratio) * t)), p * patches)
        if m < p:
            raise ValueError(
                f"SUBSET_RATIO={ratio}: image {i} gets round({ratio} x {t}) = {m} tokens, fewer than its {p} crops, "
                f"and PruMerge keeps at least one token per crop; use SUBSET_RATIO >= {p / t:.4g}"
            )
        totals += [m // p + (c < m % p) for c in range(p)]
    return totals


def fixed_budget(scores: Tensor, totals: Tensor, plus: bool, summary: bool) -> tuple[Tensor, Tensor]:
    """A fixed budget: scores: (B, N), totals: (B,) long, the tokens each crop hands the LLM
    (1 <= totals[b] <= N) -> (K: (B,) attention picks, with_summary: (B,) bool).

    Every crop's output fits its total: K attention picks (+ PruMerge+'s uniform samples not among
    them) + the summary token. The summary is kept when the total leaves room for a patch besides
    it, and never when the total is N (nothing is dropped: the crop is handed over unmerged).
    PruMerge: K = total - summary. PruMerge+: the largest K whose picks plus samples fit (the
    samples' stride shrinks as K grows); ValueError when not even K = 1 fits.
    """
    n = scores.shape[1]
    if bool(((totals < 1) | (totals > n)).any()):
        raise ValueError(f"totals: every crop's token total must be in [1, {n}], got {totals.tolist()}")
    with_summary = (totals >= 2) & (totals < n) & bool(summary)
    room = totals - with_summary.long()  # (B,) rows for patches
    if not plus:
        return room, with_summary
    # PruMerge+: rows used by K picks = K + the samples of K's stride ranked >= K (not among the picks)
    order = scores.float().argsort(dim=1, descending=True, stable=True)  # (B, N), as `top_scores`
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand_as(order))
    ks = torch.arange(1, n + 1, device=scores.device)  # (N,) every candidate K
    samples = uniform_additions(torch.zeros(n, n, dtype=torch.bool, device=scores.device), ks)  # (K, N) sample masks
    extra = (samples[None] & (rank[:, None, :] >= ks[None, :, None])).sum(-1)  # (B, K)
    used = ks[None] + extra  # (B, K)
    fits = used <= room[:, None]
    k = torch.where(fits, ks[None], 0).amax(dim=1)  # (B,) the largest K that fits, 0 if none
    if bool((k == 0).any()):
        b = int((k == 0).nonzero()[0, 0])
        least = int(used[b, 0]) + int(with_summary[b])
        raise ValueError(
            f"SUBSET_RATIO: PruMerge+ hands the LLM at least {least} tokens for a crop of {n} patches (1 attention "
            f"pick, its uniform samples{', the summary token' if with_summary[b] else ''}), more than its budget "
            f"of {int(totals[b])}; use a larger SUBSET_RATIO, or BASELINE=PRUMERGE"
        )
    return k, with_summary


def top_scores(scores: Tensor, k: Tensor) -> Tensor:
    """scores: (B, N), k: (B,) -> (B, N) bool: each row's k[b] highest scores (ties: lower index)."""
    order = scores.float().argsort(dim=1, descending=True, stable=True)  # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank < k[:, None]


def uniform_additions(kept: Tensor, k: Tensor) -> Tensor:
    """PruMerge+'s spatial samples: kept: (B, N) bool, k: (B,) the attention budget ->
    (B, N) bool, the samples 0, s, 2s, ... < N - 1 not already kept, s = floor(floor(N / K) / 3) >= 1
    (floor(1 / (K / N)) evaluated in fp64 as the official code does in Python floats)."""
    n = kept.shape[1]
    step = torch.floor(1.0 / (k.double() / n))
    stride = torch.floor(step / 3).clamp_min(1).long()  # (B,)
    pos = torch.arange(n, device=kept.device)
    samples = (pos[None] % stride[:, None] == 0) & (pos[None] < n - 1)
    return samples & ~kept


def ordered_sources(kept: Tensor, scores: Tensor, first: Tensor, order: str) -> tuple[Tensor, Tensor]:
    """kept: (B, N) bool, first: (B, N) bool (the attention picks, a subset of kept) ->
    (picks (B, M_max) long, -1 padded; counts (B,)). "ascending": by index; "official": the
    attention picks by descending score, then the rest by index."""
    n = kept.shape[1]
    pos = torch.arange(n, device=kept.device, dtype=torch.float64)
    if order == "ascending":
        key = pos.expand(kept.shape)
    elif order == "official":
        # attention picks first (descending score), then the others ascending; scores are in [0, 1]
        key = torch.where(first, -2.0 - scores.double(), pos)
    else:
        raise ValueError(f"order={order!r}: must be 'ascending' or 'official'")
    key = key.masked_fill(~kept, float("inf"))
    counts = kept.sum(dim=1)
    m_max = int(counts.max())  # one host read per call: the output's width
    picks = key.argsort(dim=1, stable=True)[:, :m_max]
    slot = torch.arange(m_max, device=kept.device)
    return picks.masked_fill(slot >= counts[:, None], -1), counts


def merge_kept(features: Tensor, keys: Tensor, scores: Tensor, picks: Tensor, kept: Tensor, knn: int,
               summary: bool) -> Tensor:
    """The merge. features: (B, N, D), keys: (B, N, C) patch keys, scores: (B, N), picks: (B, M)
    (-1 padded), kept: (B, N) bool -> (B, M (+1), D) fp32: row t = x_p + sum_j a_j x_j over the
    min(knn, N - 1) patches j != p with the largest cos(key_p, key_j) (p = picks[b, t]); padding
    rows zero; with `summary` a last row sum over the not-kept patches of a_j x_j."""
    x = features.float()
    a = scores.float()
    bsz, n, _ = x.shape
    unit = F.normalize(keys.float(), dim=-1)  # (B, N, C)
    valid = picks >= 0  # (B, M)
    p = picks.clamp_min(0)
    unit_p = torch.gather(unit, 1, p[..., None].expand(-1, -1, unit.shape[-1]))  # (B, M, C)
    cos = torch.bmm(unit_p, unit.transpose(1, 2))  # (B, M, N)
    cos = cos.scatter(2, p[..., None], float("-inf"))  # never its own neighbour
    near = cos.topk(min(knn, n - 1), dim=2).indices if n > 1 else cos.new_zeros(bsz, p.shape[1], 0, dtype=torch.long)
    weights = torch.zeros_like(cos).scatter_(2, near, torch.gather(a[:, None].expand_as(cos), 2, near))  # (B, M, N)
    own = torch.gather(x, 1, p[..., None].expand(-1, -1, x.shape[-1]))  # (B, M, D)
    merged = (own + torch.bmm(weights, x)) * valid[..., None]
    if not summary:
        return merged
    rest = torch.bmm((a * ~kept)[:, None], x)  # (B, 1, D)
    return torch.cat([merged, rest], dim=1)


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """A merge method's output for B crops.

    features: (B, M_max, D) the new tokens (fp32), row t of crop b valid for t < counts[b];
    sources: (B, M_max) long, per row the patch it stands for (`SUMMARY` for the summary token,
    -1 for padding); counts: (B,) long tokens per crop; budget: (B,) long, the attention budget K
    (before PruMerge+'s samples and the summary token).
    """

    features: Tensor
    sources: Tensor
    counts: Tensor
    budget: Tensor


@dataclasses.dataclass
class PruMerge(TokenMerger):
    """LLaVA-PruMerge (see the module docstring): IQR outliers of the CLS attention, merged with
    their `knn` nearest patches by key cosine, plus one summary token."""

    name: ClassVar[str] = "prumerge"
    display_name: ClassVar[str] = "PruMerge"
    table_rank: ClassVar[int] = 200
    plus: ClassVar[bool] = False

    knn: int = param(32, env="PRUMERGE_KNN", tag="knn", label="k", kind=int,
                     doc="patches merged into each kept token, >= 1")
    summary: int = param(1, env="PRUMERGE_SUMMARY", tag="sum", label="summary", kind=int,
                         doc="1 appends the summary token of the dropped patches (official), 0 does not")

    def __post_init__(self) -> None:
        if isinstance(self.knn, bool) or not isinstance(self.knn, int) or self.knn < 1:
            raise ValueError(f"knn={self.knn!r}: must be an integer >= 1")
        if self.summary not in (0, 1) or isinstance(self.summary, float):
            raise ValueError(f"summary={self.summary!r}: must be 0 or 1")

    def keep_mask(self, scores: Tensor, ratio: float | str,
                  totals: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """scores: (B, N) -> (kept (B, N) bool, attention picks (B, N) bool, budget K (B,), with the
        summary token (B,) bool, kept whole (B,) bool: handed over unmerged). Adaptive ("iqr"): the
        IQR budget, the summary as configured, always merged. A fixed ratio: `fixed_budget` of
        `totals` (B,) (default round(ratio N) per crop); a crop whose total is N is kept whole."""
        if ratio == ADAPTIVE:
            k = budget(scores, ratio)
            with_summary = torch.full_like(k, bool(self.summary), dtype=torch.bool)
            whole = torch.zeros_like(with_summary)
        else:
            if totals is None:
                totals = budget(scores, ratio)
            totals = totals.to(scores.device)
            k, with_summary = fixed_budget(scores, totals, self.plus, bool(self.summary))
            whole = totals == scores.shape[1]
        first = top_scores(scores, k)
        kept = first | uniform_additions(first, k) if self.plus else first
        return kept, first, k, with_summary, whole

    def merge(self, features: Tensor, q_cls: Tensor, keys: Tensor, ratio: float | str = ADAPTIVE,
              order: str = "ascending", totals: Tensor | None = None) -> MergeResult:
        """features: (B, N, D) the selected hidden state's patches; q_cls: (B, C); keys: (B, 1 + N, C).

        `ratio`: "iqr" (adaptive) or a fixed ratio; with a fixed ratio each crop hands the LLM at
        most `totals[b]` tokens in total (default round(ratio N); `crop_totals` for images of
        several crops), summary and PruMerge+'s samples included; a crop whose total is N is
        handed over as it is (no merge, no summary: the unpruned patches)."""
        if features.dim() != 3 or keys.shape[:2] != (features.shape[0], features.shape[1] + 1):
            raise ValueError(
                f"features (B, N, D) and keys (B, 1 + N, C) must agree, got {tuple(features.shape)} and {tuple(keys.shape)}"
            )
        check_ratio(ratio)
        scores = cls_attention(q_cls, keys)  # (B, N)
        kept, first, k, with_summary, whole = self.keep_mask(scores, ratio, totals)
        picks, counts = ordered_sources(kept, scores, first, order)
        merge_scores = scores * ~whole[:, None]  # a crop kept whole absorbs nothing: its patches as they are
        merged = merge_kept(features.detach(), keys.detach()[:, 1:], merge_scores, picks, kept, self.knn, True)
        if not bool(with_summary.any()):
            return MergeResult(merged[:, :-1], picks, counts, k)
        slot = torch.arange(merged.shape[1], device=merged.device)
        at = (counts[:, None] == slot) & with_summary[:, None]  # the summary goes right after each crop's last kept row
        body = merged * (slot < counts[:, None])[..., None]  # kept rows; padding and the last slot zero
        rows = torch.where(at[..., None], merged[:, -1:], body)
        sources = torch.cat([picks, picks.new_full((picks.shape[0], 1), -1)], dim=1).masked_fill(at, SUMMARY)
        return MergeResult(rows, sources, counts + with_summary.long(), k)


@dataclasses.dataclass
class PruMergePlus(PruMerge):
    """LLaVA-PruMerge+: PruMerge's outliers plus spatially uniform samples (see the module docstring)."""

    name: ClassVar[str] = "prumerge_plus"
    aliases: ClassVar[tuple[str, ...]] = ("prumerge+",)
    display_name: ClassVar[str] = "PruMerge+"
    table_rank: ClassVar[int] = 210
    plus: ClassVar[bool] = True


def check_ratio(ratio: object) -> None:
    if ratio == ADAPTIVE:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r}: must be a number in (0, 1] or {ADAPTIVE!r} (PruMerge's adaptive budget)")


# ------------------------------------------------------------------ capturing q / k in a tower
@contextlib.contextmanager
def capture_projections(q_proj: nn.Module, k_proj: nn.Module):
    """Within the block, the outputs of `q_proj` (only its CLS row) and `k_proj` of the forwards
    run are collected: yields a dict whose "q_cls" / "keys" are lists of (B, C) / (B, T, C)."""
    got: dict[str, list[Tensor]] = {"q_cls": [], "keys": []}
    handles = [
        q_proj.register_forward_hook(lambda _m, _i, out: got["q_cls"].append(out[:, 0].detach())),
        k_proj.register_forward_hook(lambda _m, _i, out: got["keys"].append(out.detach())),
    ]
    try:
        yield got
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_inputs(module: nn.Module):
    """Within the block, the first positional input of each `module` forward is collected (a list)."""
    got: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        yield got
    finally:
        handle.remove()


def encoder_layers(tower: nn.Module, name: str = "vision tower"):
    """The encoder layers of a CLIP-like tower (`encoder.layers`, or `vision_model.encoder.layers`),
    each with `self_attn.q_proj` / `k_proj`; NoClsTokenError when the tower is not of that kind."""
    for path in ("encoder", "vision_model.encoder"):
        module = tower
        for part in path.split("."):
            module = getattr(module, part, None)
        layers = getattr(module, "layers", None)
        if layers is not None and hasattr(layers[0], "self_attn") and hasattr(layers[0].self_attn, "q_proj"):
            return layers
    raise NoClsTokenError(f"{name} ({type(tower).__name__}): no CLIP encoder layers with q_proj / k_proj found")


def consuming_layer(select_layer: int, num_layers: int) -> int:
    """The index of the encoder layer whose input is hidden state `select_layer` (of num_layers + 1)."""
    index = select_layer % (num_layers + 1)
    if index >= num_layers:
        raise ValueError(
            f"mm_vision_select_layer={select_layer}: PruMerge scores patches with the attention of the layer that reads "
            f"the selected hidden state; the last hidden state (of {num_layers} layers) is read by none"
        )
    return index
