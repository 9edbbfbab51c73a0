"""FitPrune's pruning recipe: how many visual tokens each decoder layer drops, for a FLOPs budget.

FitPrune (Ye et al., "Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal
Large Language Models", AAAI 2025) turns attention statistics of a small calibration set into a
per-layer *recipe*, then at inference drops, at each layer of the recipe, the visual tokens that
receive the least attention. This module is the pure part: statistics -> recipe, the recipe file,
and the recipe's FLOPs. The model glue lives in our `llava` package: `llava.calibrate` collects the statistics (it loads a
model), and `llava.model.in_llm` computes, inside the decoder, the attention the rule at the end
of this file reads (the drop itself needs a running decoder).

Statistics. For every decoder layer l and calibration sample, the visual tokens' attention
received, averaged over heads: from the visual queries (self attention) and from the text queries
after the image (cross attention), each a mean over its queries of the softmax rows (which sum to
1 over all keys). `attention_loss_curves` sorts each layer's values ascending and accumulates
them: `curve[l, k]` = attention mass lost at layer l when its k least-attended visual tokens are
absent (mean over samples). Dropping keys of mass m from a softmax row changes the distribution
P into P' (P restricted and renormalised) with KL(P' || P) = -log(1 - m), so the lost mass is the
divergence up to a monotone map.

Search (`search_recipe`). Let g[l, k] = max(self curve, cross curve) and, for a threshold a,
k_l(a) = max {k : g[l, k] <= a} (0 for layers before `first_layer`). The removed counts are the
largest non-decreasing schedule with g[l, c_l] <= a at every layer: c_l = min_{l' >= l} k_l'(a).
The recipe uses the smallest a (over all values g takes: an exact binary search) whose schedule
meets the budget `FLOPs(c) <= floor((1 - reduction) * FLOPs(unpruned))`, so among all monotone
schedules that meet the budget it minimises the largest per-layer attention loss (self or
cross), and for that loss it removes every token it allows. FLOPs use docs/ALGORITHM.md 6 with the
model's own sizes (`otprune.flops`): 4 n d^2 + 2 n^2 d + 2 n d m per layer, n = text + V - c_l.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from otprune import flops
from otprune.methods.in_llm import InLLMRule, StageContext, top_k

RECIPE_FORMAT = "otprune-fitprune-recipe"
RECIPE_VERSION = 1


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class FitPruneRecipe:
    """A FitPrune recipe: visual tokens absent from each decoder layer's input.

    Attributes:
        num_layers: decoder layers T of the model it was computed for.
        hidden_size, intermediate_size: that model's d and m (for the FLOPs).
        visual_tokens: visual tokens V per image it was computed for.
        text_tokens: text tokens per sample assumed by the FLOPs budget (calibration mean).
        removed: (T,) cumulative visual tokens absent from layer l's input; non-decreasing,
            removed[0] = 0. Layer l drops `removed[l] - removed[l-1]` more tokens.
        reduction: the asked-for fraction of the decoder's FLOPs to remove.
        threshold: the attention-loss threshold the search found (see the module docstring).
        max_attention_loss: the largest estimated attention loss of the schedule (<= threshold).
        calibration: free-form facts about the calibration (model path, data, samples).
        source: the file it was read from ("" when built in memory).
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    visual_tokens: int
    text_tokens: int
    removed: tuple[int, ...]
    reduction: float
    threshold: float = 0.0
    max_attention_loss: float = 0.0
    calibration: Mapping[str, object] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    source: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        for name, minimum in (("num_layers", 1), ("hidden_size", 1), ("intermediate_size", 1), ("visual_tokens", 1),
                              ("text_tokens", 0)):
            object.__setattr__(self, name, _int(name, getattr(self, name), minimum))
        removed = tuple(_int(f"removed[{i}]", v, 0) for i, v in enumerate(self.removed))
        object.__setattr__(self, "removed", removed)
        if len(removed) != self.num_layers:
            raise ValueError(f"removed: {len(removed)} counts for num_layers={self.num_layers}; give one per layer")
        if removed[0] != 0:
            raise ValueError(f"removed[0]={removed[0]}: layer 0 must see every token (pruning starts at layer 1)")
        for i in range(1, len(removed)):
            if removed[i] < removed[i - 1]:
                raise ValueError(
                    f"removed: must be non-decreasing (a dropped token stays dropped), got {removed[i - 1]} at layer "
                    f"{i - 1} then {removed[i]} at layer {i}"
                )
        if removed[-1] > self.visual_tokens:
            raise ValueError(f"removed: {removed[-1]} tokens at the last layer, more than visual_tokens={self.visual_tokens}")
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, numbers.Real) or not 0.0 <= self.reduction < 1.0:
            raise ValueError(f"reduction={self.reduction!r}: must be a number in [0, 1)")
        for name in ("threshold", "max_attention_loss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: must be a finite number")

    # ---------------------------------------------------------------- derived quantities
    @property
    def size(self) -> flops.DecoderSize:
        return flops.DecoderSize(self.hidden_size, self.intermediate_size, self.num_layers)

    @property
    def kept(self) -> list[int]:
        """Visual tokens seen by each layer."""
        return [self.visual_tokens - r for r in self.removed]

    @property
    def drops(self) -> list[int]:
        """Visual tokens dropped entering each layer (incremental)."""
        return [r - (self.removed[i - 1] if i else 0) for i, r in enumerate(self.removed)]

    @property
    def first_layer(self) -> int | None:
        """The first layer that drops tokens; None for an empty recipe."""
        return next((i for i, d in enumerate(self.drops) if d > 0), None)

    @property
    def tokens_per_layer(self) -> list[int]:
        """Sequence length seen by each layer for `text_tokens` + one image of `visual_tokens`."""
        return [self.text_tokens + k for k in self.kept]

    @property
    def flops_unpruned(self) -> int:
        n = self.text_tokens + self.visual_tokens
        return flops.schedule_flops([n] * self.num_layers, self.hidden_size, self.intermediate_size)

    @property
    def flops_pruned(self) -> int:
        return flops.schedule_flops(self.tokens_per_layer, self.hidden_size, self.intermediate_size)

    @property
    def budget_flops(self) -> int:
        """The largest pruned FLOPs that meets the budget: floor((1 - reduction) * unpruned)."""
        return budget(self.flops_unpruned, self.reduction)

    @property
    def achieved_reduction(self) -> float:
        return 1.0 - self.flops_pruned / self.flops_unpruned

    def removed_for(self, visual_tokens: int) -> list[int]:
        """Cumulative removed counts for an image of `visual_tokens` tokens.

        Exactly `removed` when the image has the recipe's V; otherwise the same fractions,
        `round(removed[l] * V' / V)` (Python's round; still non-decreasing) -- e.g. for LLaVA-1.6,
        whose images have different token counts.
        """
        v = _int("visual_tokens", visual_tokens, 0)
        if v == self.visual_tokens:
            return list(self.removed)
        return [min(v, int(round(r * v / self.visual_tokens))) for r in self.removed]

    def check_model(self, num_layers: int, hidden_size: int | None = None, intermediate_size: int | None = None) -> None:
        """Refuse a recipe computed for a model of other sizes (ValueError naming both)."""
        where = f" ({self.source})" if self.source else ""
        if num_layers != self.num_layers:
            raise ValueError(
                f"FITPRUNE_RECIPE{where}: computed for a model of {self.num_layers} decoder layers, but this model has "
                f"{num_layers}; calibrate a recipe for it with `otprune fitprune-calibrate --model ...`"
            )
        for name, value, mine in (("hidden_size", hidden_size, self.hidden_size),
                                  ("intermediate_size", intermediate_size, self.intermediate_size)):
            if value is not None and value != mine:
                raise ValueError(
                    f"FITPRUNE_RECIPE{where}: computed for {name}={mine}, but this model has {name}={value}; "
                    "calibrate a recipe for it with `otprune fitprune-calibrate --model ...`"
                )

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "reduction": self.reduction,
            "removed_per_layer": list(self.removed),
            "drop_per_layer": self.drops,
            "kept_per_layer": self.kept,
            "tokens_per_layer": self.tokens_per_layer,
            "first_layer": self.first_layer,
            "threshold": self.threshold,
            "max_attention_loss": self.max_attention_loss,
            "flops_unpruned": self.flops_unpruned,
            "flops_pruned": self.flops_pruned,
            "budget_flops": self.budget_flops,
            "achieved_reduction": self.achieved_reduction,
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_json(cls, data: object, source: str = "") -> FitPruneRecipe:
        """Parse `to_json`'s dict. Only `removed_per_layer` and the sizes are read; the derived
        fields (kept, drops, FLOPs) are recomputed. Malformed input -> ValueError naming the field."""
        where = f" {source}" if source else ""
        if not isinstance(data, Mapping):
            raise ValueError(f"FitPrune recipe{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != RECIPE_FORMAT:
            raise ValueError(
                f"FitPrune recipe{where}: 'format' is {data.get('format')!r}, expected {RECIPE_FORMAT!r}; "
                "write recipes with `otprune fitprune-calibrate`"
            )
        if data.get("version") != RECIPE_VERSION:
            raise ValueError(f"FitPrune recipe{where}: 'version' is {data.get('version')!r}, this code reads {RECIPE_VERSION}")
        required = ("num_layers", "hidden_size", "intermediate_size", "visual_tokens", "text_tokens", "reduction",
                    "removed_per_layer")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"FitPrune recipe{where}: missing field(s) {missing}")
        removed = data["removed_per_layer"]
        if not isinstance(removed, list):
            raise ValueError(f"FitPrune recipe{where}: 'removed_per_layer' must be a list of integers")
        calibration = data.get("calibration") or {}
        try:
            return cls(
                num_layers=data["num_layers"],
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                visual_tokens=data["visual_tokens"],
                text_tokens=data["text_tokens"],
                removed=tuple(removed),
                reduction=data["reduction"],
                threshold=data.get("threshold", 0.0),
                max_attention_loss=data.get("max_attention_loss", 0.0),
                calibration=calibration if isinstance(calibration, Mapping) else {},
                source=source,
            )
        except ValueError as err:
            raise ValueError(f"FitPrune recipe{where}: {err}") from None


def budget(flops_unpruned: int, reduction: float) -> int:
    """floor((1 - reduction) * flops_unpruned), exactly for the float `reduction`."""
    from fractions import Fraction

    return math.floor(Fraction(flops_unpruned) * (1 - Fraction(reduction)))


_CACHE: dict[str, tuple[tuple[int, int, int], FitPruneRecipe]] = {}


def load_recipe(path: str | os.PathLike) -> FitPruneRecipe:
    """Read a recipe file (cached until the file changes). Missing -> FileNotFoundError,
    malformed -> ValueError, both naming the path."""
    name = os.fspath(path)
    try:
        stat = os.stat(name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"FITPRUNE_RECIPE={name!r}: no such file; write one with "
            "`otprune fitprune-calibrate --model DIR --data FILE.jsonl --reduction 0.6 --out recipe.json`"
        ) from None
    if not os.path.isfile(name):
        raise ValueError(f"FITPRUNE_RECIPE={name!r}: not a file")
    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    cached = _CACHE.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        data = json.loads(Path(name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"FITPRUNE_RECIPE={name!r}: not valid JSON ({err})") from None
    except RecursionError:  # the JSON parser recurses once per nesting level
        raise ValueError(
            f"FITPRUNE_RECIPE={name!r}: JSON nested too deeply to read (a recipe is a flat object of numbers and "
            "lists); write recipes with `otprune fitprune-calibrate`"
        ) from None
    recipe = FitPruneRecipe.from_json(data, source=name)
    _CACHE[name] = (key, recipe)
    return recipe


def save_recipe(recipe: FitPruneRecipe, path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
    return out


# -------------------------------------------------------------------- statistics -> curves
def attention_loss_curves(attention: Tensor) -> Tensor:
    """(T, V) attention received per visual token and layer -> (T, V + 1) attention lost.

    `curve[l, k]` is the sum of the k smallest values of layer l (curve[l, 0] = 0), in fp64.
    """
    if attention.dim() != 2 or attention.shape[1] < 1:
        raise ValueError(f"attention: expected (layers, visual tokens), got shape {tuple(attention.shape)}")
    values = attention.detach().to(torch.float64).clamp_min(0.0).sort(dim=1).values
    return torch.cat([values.new_zeros(values.shape[0], 1), values.cumsum(dim=1)], dim=1)


def resample_curves(curves: Tensor, visual_tokens: int) -> Tensor:
    """(T, V + 1) curves -> (T, visual_tokens + 1), linear in the dropped fraction k / V.

    Lets calibration images with different token counts (LLaVA-1.6) share one set of curves.
    """
    v = curves.shape[1] - 1
    if v == visual_tokens:
        return curves
    x = torch.arange(visual_tokens + 1, dtype=torch.float64) * (v / visual_tokens)  # positions in the old grid
    lo = x.floor().long().clamp(max=v)
    hi = (lo + 1).clamp(max=v)
    w = (x - lo).to(curves.dtype)
    return curves[:, lo] * (1 - w) + curves[:, hi] * w


@dataclasses.dataclass
class CurveAccumulator:
    """Running mean of the self- and cross-attention loss curves over calibration samples."""

    visual_tokens: int | None = None
    samples: int = 0
    self_sum: Tensor | None = None
    cross_sum: Tensor | None = None

    def add(self, self_attention: Tensor, cross_attention: Tensor) -> None:
        """self_attention, cross_attention: (T, V) attention received by each visual token of one image."""
        if self_attention.shape != cross_attention.shape:
            raise ValueError(f"self and cross attention: shapes differ, {tuple(self_attention.shape)} vs "
                             f"{tuple(cross_attention.shape)}")
        if self.visual_tokens is None:
            self.visual_tokens = int(self_attention.shape[1])
        s = resample_curves(attention_loss_curves(self_attention), self.visual_tokens)
        c = resample_curves(attention_loss_curves(cross_attention), self.visual_tokens)
        if self.self_sum is None:
            self.self_sum, self.cross_sum = s, c
        else:
            if s.shape != self.self_sum.shape:
                raise ValueError(f"attention statistics: {s.shape[0]} layers, earlier samples had {self.self_sum.shape[0]}")
            self.self_sum = self.self_sum + s
            self.cross_sum = self.cross_sum + c
        self.samples += 1

    def curves(self) -> tuple[Tensor, Tensor]:
        if not self.samples:
            raise ValueError("attention statistics: no calibration sample was added")
        return self.self_sum / self.samples, self.cross_sum / self.samples


# -------------------------------------------------------------------- the search
def _schedule(loss: Tensor, alpha: float, first_layer: int) -> list[int]:
    """The largest non-decreasing removed counts with loss[l, c_l] <= alpha at every layer."""
    allowed = (loss <= alpha).sum(dim=1) - 1  # (T,) max k with loss[l, k] <= alpha (loss is non-decreasing)
    allowed[:first_layer] = 0
    allowed = allowed.clamp_min(0)
    # suffix minimum: a token absent from layer l is absent from every later layer too
    return torch.flip(torch.cummin(torch.flip(allowed, [0]), dim=0).values, [0]).tolist()


def search_recipe(
    self_curves: Tensor,
    cross_curves: Tensor,
    *,
    size: flops.DecoderSize,
    text_tokens: int,
    reduction: float,
    first_layer: int = 1,
    calibration: Mapping[str, object] | None = None,
) -> FitPruneRecipe:
    """The recipe that meets `reduction` with the least attention loss (see the module docstring).

    Args:
        self_curves, cross_curves: (T, V + 1) mean attention-loss curves (`CurveAccumulator.curves`).
        size: the model's decoder sizes (T must match the curves).
        text_tokens: text tokens per sample assumed by the budget.
        reduction: fraction of the decoder FLOPs to remove, in (0, 1).
        first_layer: the first layer that may drop tokens (>= 1).
    """
    if self_curves.shape != cross_curves.shape or self_curves.dim() != 2:
        raise ValueError(f"curves: expected two (T, V + 1) tensors of the same shape, got {tuple(self_curves.shape)} "
                         f"and {tuple(cross_curves.shape)}")
    layers, v1 = self_curves.shape
    visual = v1 - 1
    if layers != size.layers:
        raise ValueError(f"curves: {layers} layers, but the model has {size.layers}")
    if isinstance(reduction, bool) or not isinstance(reduction, numbers.Real) or not 0.0 < reduction < 1.0:
        raise ValueError(f"reduction={reduction!r}: must be a number in (0, 1), the fraction of FLOPs to remove, e.g. 0.6")
    first_layer = _int("first_layer", first_layer, 1)
    if first_layer >= layers:
        raise ValueError(f"first_layer={first_layer}: must be < the number of layers ({layers})")
    text_tokens = _int("text_tokens", text_tokens, 0)
    loss = torch.maximum(self_curves, cross_curves).to(torch.float64)
    loss = torch.cummax(loss, dim=1).values  # non-decreasing in k (guards against rounding)
    full = flops.schedule_flops([text_tokens + visual] * layers, size.hidden, size.intermediate)
    limit = budget(full, reduction)

    def cost(removed: list[int]) -> int:
        return flops.schedule_flops([text_tokens + visual - r for r in removed], size.hidden, size.intermediate)

    candidates = torch.unique(loss[first_layer:].flatten()).tolist()  # ascending
    most = _schedule(loss, candidates[-1], first_layer)
    if cost(most) > limit:
        best = 1.0 - cost(most) / full
        raise ValueError(
            f"reduction={reduction}: unreachable; removing every visual token from layer {first_layer} on saves "
            f"{best:.1%} of the FLOPs ({visual} visual + {text_tokens} text tokens, {layers} layers)"
        )
    lo, hi = 0, len(candidates) - 1  # invariant: candidates[hi] is feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(_schedule(loss, candidates[mid], first_layer)) <= limit:
            hi = mid
        else:
            lo = mid + 1
    alpha = float(candidates[hi])
    removed = _schedule(loss, alpha, first_layer)
    worst = max(float(loss[layer, r]) for layer, r in enumerate(removed))
    return FitPruneRecipe(
        num_layers=layers,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        visual_tokens=visual,
        text_tokens=text_tokens,
        removed=tuple(int(r) for r in removed),
        reduction=float(reduction),
        threshold=alpha,
        max_attention_loss=worst,
        calibration=dict(calibration or {}),
    )



# ----------------------------------------------------------------------------- the in-LLM rule
@dataclasses.dataclass
class FitPrune(InLLMRule):
    """FitPrune at inference (`BASELINE=FITPRUNE FITPRUNE_RECIPE=recipe.json`): before each layer l
    where the recipe drops tokens, every image keeps its tokens with the largest self + cross
    attention received in layer l (`StageContext.received_attention`, computed on layer l's
    input), `recipe.removed_for(V)` saying how many go.

    Where the other half is: this file is FitPrune's pure half (the recipe search above, the
    recipe file, this rule); the model half, which needs a running decoder, is in our `llava`
    package: `llava.model.in_llm` computes the attention this rule reads, and
    `llava.calibrate` runs a model over a calibration set to collect the statistics that
    `search_recipe` turns into a recipe (`otprune fitprune-calibrate`).
    """

    name = "fitprune"
    display_name = "FitPrune"
    table_rank = 30
    uses_ratio = False

    def resolve(self, layer: int | None, ratio: float | None, recipe: object) -> tuple[int, float | None, object]:
        if recipe is None:
            raise ValueError(
                "recipe: FitPrune needs a recipe (FITPRUNE_RECIPE=recipe.json); write one with "
                "`otprune fitprune-calibrate --model DIR --data FILE.jsonl --reduction 0.6 --out recipe.json`"
            )
        recipe = recipe if isinstance(recipe, FitPruneRecipe) else load_recipe(recipe)
        first = recipe.first_layer
        if first is None:
            raise ValueError(f"FITPRUNE_RECIPE={recipe.source or '<in memory>'}: drops no token at any layer")
        if layer is not None and layer != first:
            raise ValueError(
                f"layer={layer} (LAYER_INDEX): FitPrune prunes where its recipe says, first at layer {first}; "
                f"unset LAYER_INDEX or set it to {first}"
            )
        return first, None, recipe

    def schedule(self, config, tokens: int, num_layers: int) -> list[int]:
        return [tokens - r for r in config.recipe.removed_for(tokens)]

    def check_model(self, config, num_layers: int, hidden_size: int, intermediate_size: int) -> None:
        config.recipe.check_model(num_layers, hidden_size, intermediate_size)

    def keep(self, ctx: StageContext) -> Tensor:
        self_attention, cross_attention = ctx.received_attention()
        return top_k(self_attention + cross_attention, ctx.lengths, ctx.keep)
