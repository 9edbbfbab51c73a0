"""`select_tokens`: which K of a set of visual tokens to keep, for one sample or a ragged batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from otprune.config import compile_selection
from otprune.methods import get_method
from otprune.methods.base import check_finite, mask_beyond_k

ORDERS = ("ascending", "greedy", "official")


def keep_counts(keep: int | float, lengths: Tensor) -> Tensor:
    """Tokens to keep per sample: (B,) long from lengths: (B,) long.

    An int `keep` is a count (at most each sample's length); a float is a ratio in (0, 1] and
    gives K = round(ratio * n) (half to even, as Python's `round`), at least 1; a (B,) integer
    tensor is a count per sample (an adaptive budget, e.g. PruMerge's IQR rule: DivPrune*), each
    in [1, lengths[b]].
    """
    if isinstance(keep, Tensor):
        if keep.dtype.is_floating_point or keep.dtype == torch.bool or keep.shape != lengths.shape:
            raise ValueError(
                f"keep: a per-sample count tensor must be {tuple(lengths.shape)} integers, got shape "
                f"{tuple(keep.shape)} dtype {keep.dtype}"
            )
        counts = keep.to(device=lengths.device, dtype=torch.long)
        bad = (counts < 1) | (counts > lengths)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"keep[{b}]={int(counts[b])}: a per-sample count must be in [1, {int(lengths[b])}] (that sample's tokens)")
        return counts
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r}: must be an int count >= 1 or a float ratio in (0, 1]")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep={keep}: a token count must be >= 1")
        shortest = int(lengths.min())
        if keep > shortest:
            raise ValueError(
                f"keep={keep} tokens, but a sample has only {shortest}; pass a count <= {shortest} "
                "or a ratio in (0, 1]"
            )
        return torch.full_like(lengths, keep)
    if not (0.0 < keep <= 1.0):  # also rejects NaN
        raise ValueError(f"keep={keep!r}: a ratio must be in (0, 1]")
    return (lengths.double() * keep).round().long().clamp_min(1)


def _check_lengths(lengths: Sequence[int] | Tensor | None, bsz: int, n: int, device) -> Tensor:
    if lengths is None:
        return torch.full((bsz,), n, dtype=torch.long, device=device)
    lengths_t = torch.as_tensor(lengths)
    if lengths_t.dtype.is_floating_point or lengths_t.dtype == torch.bool or lengths_t.shape != (bsz,):
        raise ValueError(
            f"lengths: must be {bsz} integers (one per sample), got shape {tuple(lengths_t.shape)} "
            f"dtype {lengths_t.dtype}"
        )
    lo, hi = int(lengths_t.min()), int(lengths_t.max())
    if lo < 1 or hi > n:
        raise ValueError(f"lengths: every value must be in [1, {n}] (N of features), got min {lo}, max {hi}")
    return lengths_t.to(device=device, dtype=torch.long)


def select_tokens(
    features: Tensor,
    keep: int | float,
    method: str = "otprune",
    *,
    lengths: Sequence[int] | Tensor | None = None,
    order: str = "ascending",
    compiled: bool | None = None,
    **params: object,
) -> Tensor:
    """Indices of the visual tokens to keep.

    Args:
        features: (N, D) tokens of one image, or (B, N, D) a batch (rows past `lengths[b]` are
            padding and never selected). Any float dtype; selection runs in fp32 (fp64 stays fp64).
        keep: int count, or float ratio in (0, 1] giving K = int(round(ratio * n)) >= 1 per sample,
            or a (B,) integer tensor: a count per sample (adaptive budgets).
        method: a name of `otprune.METHODS` (case-insensitive, aliases such as `OURS`).
        lengths: (B,) valid tokens per sample for ragged batches; default all N. Each sample of
            a batch is selected on its own slice: the same indices as the sample alone.
        order: "ascending" (spatial order, the default), "greedy" (the method's pick order) or
            "official" (the order the method's official code hands to the LLM: OTPrune's set
            order, ascending for the others; see `TokenSelector.official_order`). "official"
            reads the picks on the host: one synchronisation after the selection.
        compiled: run the method's `select` through `torch.compile(fullgraph=True)` (one graph per
            shape; `mode="reduce-overhead"`, i.e. CUDA graphs, on a GPU), the whole padded batch in
            one call. None (default): the `OTPRUNE_COMPILE` switch (`otprune.config.compile_selection`,
            off unless set). Off, the CPU runs its host loop and a batch sample by sample.
        **params: the method's parameters, e.g. `gamma=0.05` for OTPrune (at most fp32 max / D^2),
            `seed=1` for random.

    Returns:
        LongTensor (K,) for (N, D) input, or (B, K_max) padded with -1 where a sample keeps fewer.
    """
    selector = get_method(method, **params)
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: must be one of {', '.join(ORDERS)}")
    if not isinstance(features, Tensor):
        raise ValueError(f"features: must be a torch.Tensor of shape (N, D) or (B, N, D), got {type(features).__name__}")
    if features.dim() not in (2, 3) or 0 in features.shape:
        raise ValueError(f"features: must have shape (N, D) or (B, N, D) with N, D >= 1, got {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise ValueError(f"features: must be a floating tensor, got dtype {features.dtype}")
    single = features.dim() == 2
    x = features[None] if single else features
    bsz, n, _ = x.shape
    lengths_t = _check_lengths(lengths, bsz, n, x.device)
    if single and lengths is not None:
        raise ValueError("lengths: only for batched (B, N, D) features")
    k = keep_counts(keep, lengths_t)

    # Selection is not differentiable: never record it in an autograd graph.
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if lengths is not None:
        x = x.masked_fill((torch.arange(n, device=x.device) >= lengths_t[:, None])[..., None], 0.0)
    if compiled is None:
        compiled = compile_selection()
    if not selector.checks_finite or compiled:  # a traced method skips its own host check
        check_finite(x)

    # Without `lengths` every sample keeps the same K: no padding slots to mask (host ints only).
    uniform_k = lengths is None and not isinstance(keep, Tensor)
    k_max = _uniform_k(keep, n) if uniform_k else int(k.max())
    if compiled:
        picks = compiled_select(selector, x.device)(x, lengths_t, k, k_max).clone()  # clone: a CUDA graph reuses its output
    elif bsz == 1:
        picks = selector.select(x, lengths_t, k, k_max)  # (B, k_max), selection order
    else:
        picks = _sample_by_sample(selector, x, lengths_t, k, k_max)
    if order == "official":
        counts = k.tolist() if not uniform_k else [k_max] * bsz
        rows = [selector.official_order(row[:count]) + [-1] * (k_max - count) for row, count in zip(picks.tolist(), counts, strict=True)]
        picks = torch.tensor(rows, dtype=torch.long, device=picks.device)
        return picks[0] if single else picks
    if uniform_k:
        return (picks.sort(dim=1).values if order == "ascending" else picks)[0 if single else slice(None)]
    picks = mask_beyond_k(picks, k)
    if order == "ascending":
        picks = picks.masked_fill(picks < 0, n).sort(dim=1).values  # padding slots sort last
        picks = picks.masked_fill(picks >= n, -1)
    return picks


_COMPILED: dict[tuple[str, str], object] = {}


def compiled_select(selector, device: torch.device):
    """`selector.select` compiled with `fullgraph=True` (static shapes: one graph per (B, N, D, k_max));
    `mode="reduce-overhead"` (CUDA graphs) on a GPU. Cached per method, parameters and device type."""
    key = (repr(selector), device.type)
    if key not in _COMPILED:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[key] = torch.compile(selector.select, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[key]


def _sample_by_sample(selector, x: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
    """(B, k_max) picks of a batch, each sample selected on its own slice x[b, :lengths[b]].

    Every sample thus goes through exactly the ops, shapes and reduction orders of a call with
    that sample alone, so it gets the same indices bit for bit in fp32 too (a padded batch's
    GEMMs and reductions would round differently, and a greedy near-tie or DPP's rank cut-off
    could then fall the other way). The products that dominate the cost gain nothing from
    batching on a CPU. `TokenSelector.select` itself takes padded batches (e.g. compiled), where
    samples agree with their single calls up to rounding.
    """
    picks = torch.full((x.shape[0], k_max), -1, dtype=torch.long, device=x.device)
    for b, (length, count) in enumerate(zip(lengths.tolist(), k.tolist(), strict=True)):
        one = selector.for_sample(b) if hasattr(selector, "for_sample") else selector  # per-sample inputs (CDPruner)
        picks[b, :count] = one.select(x[b : b + 1, :length], lengths[b : b + 1], k[b : b + 1], count)[0]
    return picks


def _uniform_k(keep: int | float, n: int) -> int:
    """K for a sample of n tokens (`keep` already validated by `keep_counts`)."""
    return keep if isinstance(keep, int) else max(1, round(keep * n))


def feature_keep(ctx) -> Tensor:
    """A selection method at `LAYER_INDEX = L > 0`: each image keeps K = round(SUBSET_RATIO x V) of
    its tokens, selected on the hidden states entering layer L (the whole batch in one batched
    `select_tokens` call, fp32). (I, K_max), ascending, -1 padded."""
    features = ctx.image_values(ctx.hidden)  # (I, V_max, D); rows past an image's count are ignored
    config = ctx.config
    return select_tokens(features, float(config.ratio), config.method, lengths=ctx.lengths, order="ascending",
                         **config.method_params())
