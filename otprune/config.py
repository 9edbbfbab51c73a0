"""Pruning configuration, and the one place that reads the environment.

| variable | meaning |
|---|---|
| `BASELINE` | method name (`OURS`/`OTPRUNE`, `DIVPRUNE`, `DPP`, `RANDOM`, `UNIFORM`, `FIRSTK`, `LASTK`; model-level: `FASTV`, `VTW`, `FITPRUNE`); default OTPrune |
| `LAYER_INDEX` | where to prune: `0` = the embeddings before the LLM, `L > 0` = the hidden states entering decoder layer L; unset = `0` when `BASELINE` or `SUBSET_RATIO` is set (the paper's default), pruning off when neither is (model-level methods: see below) |
| `SUBSET_RATIO` | fraction of each image's visual tokens to keep, in (0, 1]; required with `LAYER_INDEX` and with `FASTV`; not used by `VTW` / `FITPRUNE` |
| `FITPRUNE_RECIPE` | path of a FitPrune recipe (`otprune fitprune-calibrate`); required with `BASELINE=FITPRUNE` |
| `OTPRUNE_GAMMA` | OTPrune's gamma (default 0.01) |
| `OTPRUNE_SEED` | seed of the random method (default 0) |
| `OTPRUNE_ORDER` | `ascending` (default) or `official` (the official code's set order, for exact reproduction) |
| `OTPRUNE_RECORDS` | per-sample FLOPs/latency records (`otprune.records`): unset = beside lmms-eval's `--output_path`; `off`; or a `.jsonl` file / a directory |

The model-level (attention-based) methods prune inside the LLM and are switched on by `BASELINE`
itself: `FASTV` prunes at `LAYER_INDEX` (default 2, FastV's K), keeping `SUBSET_RATIO` of each
image's tokens; `VTW` withdraws every visual token at `LAYER_INDEX` (required, >= 1);
`FITPRUNE` prunes where its recipe says (`LAYER_INDEX`, if set, must be the recipe's first
pruning layer). Kept tokens keep their rotary positions inside the LLM, so the official code's
set order (`OTPRUNE_ORDER=official`) exists only for `LAYER_INDEX=0`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping

from otprune.methods import METHODS, TokenSelector, get_method, method_parameters
from otprune.methods.otprune import check_gamma

KEEP_ORDERS = ("ascending", "official")

# Methods that prune inside the LLM from attention scores (not feature-selection methods of
# `otprune.METHODS`): name -> default layer (None: none, must be given).
MODEL_METHODS = {"fastv": 2, "vtw": None, "fitprune": None}

# How tables and figures name each method.
DISPLAY_NAMES = {
    "otprune": "OTPrune",
    "divprune": "DivPrune",
    "dpp": "DPP",
    "random": "Random",
    "uniform": "Uniform",
    "first_k": "First-K",
    "last_k": "Last-K",
    "fastv": "FastV",
    "vtw": "VTW",
    "fitprune": "FitPrune",
}


def canonical_method(name: str) -> str:
    """The canonical name of a selection method of `otprune.METHODS` or of a model-level method."""
    key = str(name).strip().lower()
    if key in MODEL_METHODS:
        return key
    if key in METHODS:
        return METHODS.canonical(key)
    raise ValueError(f"unknown selection method {name!r}; valid names: {describe_methods()}")


def describe_methods() -> str:
    return f"{METHODS.describe()}; inside the LLM: {', '.join(MODEL_METHODS)}"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune, where, and how much.

    Attributes:
        method: a selection method of `otprune.METHODS` (aliases and any case accepted), or a
            model-level method inside the LLM: "fastv", "vtw", "fitprune".
        layer: None = pruning off; 0 = prune the visual embeddings before the LLM; L > 0 = prune
            the hidden states entering decoder layer L. Defaults for the model-level methods:
            FastV 2; FitPrune the recipe's first pruning layer; VTW has none (required).
        ratio: fraction of each image's visual tokens to keep, in (0, 1]; not used by VTW and
            FitPrune (None for them).
        gamma: OTPrune's kernel weight in L = I + gamma * S S^T.
        seed: seed of the random method.
        order: order of the kept tokens handed to the LLM: "ascending" or "official"
            (`LAYER_INDEX=0` only).
        recipe: FitPrune's recipe: a path or an `otprune.fitprune.FitPruneRecipe` (loaded and
            checked here; its layer count is checked against the model at the first forward).
    """

    method: str = "otprune"
    layer: int | None = None
    ratio: float | None = None
    gamma: float = 0.01
    seed: int = 0
    order: str = "ascending"
    recipe: object = None

    def __post_init__(self) -> None:
        method = canonical_method(self.method)
        object.__setattr__(self, "method", method)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer={self.layer!r}: must be an integer >= 0, or None for no pruning")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio={self.ratio!r}: must be a number in (0, 1]")
        if method in MODEL_METHODS:
            self._check_model_method()
        elif self.recipe is not None:
            raise ValueError(f"recipe: only for method 'fitprune', got method={method!r}")
        if self.layer is not None and self.ratio is None and method not in ("vtw", "fitprune"):
            raise ValueError(f"ratio: required when pruning (layer={self.layer}); give a number in (0, 1]")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma={self.gamma!r}: must be a finite number > 0")
        check_gamma(self.gamma, 1)  # the kernel must be finite in fp32; select_tokens checks D too
        if self.order not in KEEP_ORDERS:
            raise ValueError(f"order={self.order!r}: must be one of {', '.join(KEEP_ORDERS)}")
        if self.order == "official" and self.layer is not None and (self.layer > 0 or method in MODEL_METHODS):
            raise ValueError(
                f"order='official' (OTPRUNE_ORDER): reproduces the official code's order of the kept tokens before the "
                f"LLM (layer 0) only; at layer {self.layer} the kept tokens keep their positions, use order='ascending'"
            )

    def _check_model_method(self) -> None:
        method = self.method
        if method == "fitprune":
            from otprune.fitprune import FitPruneRecipe, load_recipe

            if self.recipe is None:
                raise ValueError(
                    "recipe: FitPrune needs a recipe (FITPRUNE_RECIPE=recipe.json); write one with "
                    "`otprune fitprune-calibrate --model DIR --data FILE.jsonl --reduction 0.6 --out recipe.json`"
                )
            recipe = self.recipe if isinstance(self.recipe, FitPruneRecipe) else load_recipe(self.recipe)
            object.__setattr__(self, "recipe", recipe)
            first = recipe.first_layer
            if first is None:
                raise ValueError(f"FITPRUNE_RECIPE={recipe.source or '<in memory>'}: drops no token at any layer")
            if self.layer is None:
                object.__setattr__(self, "layer", first)
            elif self.layer != first:
                raise ValueError(
                    f"layer={self.layer} (LAYER_INDEX): FitPrune prunes where its recipe says, first at layer {first}; "
                    f"unset LAYER_INDEX or set it to {first}"
                )
            object.__setattr__(self, "ratio", None)
            return
        if self.recipe is not None:
            raise ValueError(f"recipe: only for method 'fitprune', got method={method!r}")
        if self.layer is None:
            default = MODEL_METHODS[method]
            if default is None:
                raise ValueError(f"LAYER_INDEX: not set; {method.upper()} needs the layer where it acts, an integer >= 1")
            object.__setattr__(self, "layer", default)
        if self.layer < 1:
            what = {"fastv": "ranks the visual tokens by the attention in layer L-1", "vtw": "withdraws the visual "
                    "tokens inside the LLM"}[method]
            raise ValueError(
                f"layer={self.layer} (LAYER_INDEX): {method.upper()} {what}; use a layer >= 1"
                + (" (FastV's default: 2)" if method == "fastv" else "")
            )
        if method == "vtw":
            object.__setattr__(self, "ratio", None)

    @property
    def enabled(self) -> bool:
        return self.layer is not None

    @property
    def model_level(self) -> bool:
        """True for FastV, VTW and FitPrune, which prune inside the LLM from attention scores."""
        return self.method in MODEL_METHODS

    @property
    def in_llm(self) -> bool:
        """True when pruning happens inside the LLM (layer > 0, or a model-level method)."""
        return self.enabled and (self.layer > 0 or self.model_level)

    def method_params(self) -> dict[str, object]:
        """The config values that the chosen method takes as parameters (gamma, seed, ...)."""
        if self.model_level:
            return {}
        names = method_parameters(self.method)
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def selector(self) -> TokenSelector:
        if self.model_level:
            raise ValueError(f"method {self.method!r}: a model-level method (attention scores inside the LLM), "
                             "not a feature-selection method of otprune.METHODS")
        return get_method(self.method, **self.method_params())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PruneConfig:
        """Read `BASELINE`, `LAYER_INDEX`, `SUBSET_RATIO`, `OTPRUNE_GAMMA`, `OTPRUNE_SEED`, `OTPRUNE_ORDER`,
        `FITPRUNE_RECIPE`.

        No `LAYER_INDEX`: layer 0 (the paper's default) when `BASELINE` or `SUBSET_RATIO` is set,
        pruning off when neither is; a model-level method in `BASELINE` takes its own default
        (FASTV: layer 2; FITPRUNE: the recipe's layers; VTW: LAYER_INDEX required). So setting
        any of the three switches asks for pruning, and a run never falls back to unpruned
        because one of them was forgotten. Any malformed value raises
        ValueError (a missing recipe file FileNotFoundError) naming the variable, its value and
        what is allowed: asking for pruning never silently yields an unpruned run.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return None if value is None or value.strip() == "" else value.strip()

        baseline = get("BASELINE")
        try:
            method = canonical_method(baseline) if baseline is not None else "otprune"
        except ValueError:
            raise ValueError(f"BASELINE={baseline!r}: unknown method; valid: {describe_methods()}") from None
        model_level = method in MODEL_METHODS

        layer_raw = get("LAYER_INDEX")
        layer = None
        if layer_raw is not None:
            try:
                layer = int(layer_raw)
            except ValueError:
                layer = -1
            if layer < 0:
                raise ValueError(f"LAYER_INDEX={layer_raw!r}: must be an integer >= 0 (0 = before the LLM)")

        ratio_raw = get("SUBSET_RATIO")
        ratio = None
        if ratio_raw is not None:
            ratio = _parse_float("SUBSET_RATIO", ratio_raw, "a number in (0, 1], e.g. 0.098")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"SUBSET_RATIO={ratio_raw!r}: must be a number in (0, 1], e.g. 0.098")
        if layer is None and not model_level and (baseline is not None or ratio is not None):
            layer = 0  # pruning was asked for: the paper's layer
        if method in ("vtw", "fitprune"):
            ratio = None  # VTW keeps no visual token, FitPrune's counts come from its recipe
        elif ratio is None and (layer is not None or model_level):
            why = f"LAYER_INDEX={layer_raw!r}" if layer_raw is not None else f"BASELINE={baseline!r}"
            raise ValueError(
                f"SUBSET_RATIO: not set, but {why} asks for pruning; set SUBSET_RATIO to a number in (0, 1], e.g. 0.098"
            )
        recipe = None
        if method == "fitprune":
            recipe = get("FITPRUNE_RECIPE")
            if recipe is None:
                raise ValueError(
                    "FITPRUNE_RECIPE: not set, but BASELINE=FITPRUNE needs a recipe; write one with `otprune "
                    "fitprune-calibrate --model DIR --data FILE.jsonl --reduction 0.6 --out recipe.json`"
                )

        gamma = 0.01
        if (raw := get("OTPRUNE_GAMMA")) is not None:
            gamma = _parse_float("OTPRUNE_GAMMA", raw, "a number > 0, e.g. 0.01")
            if not (math.isfinite(gamma) and gamma > 0):
                raise ValueError(f"OTPRUNE_GAMMA={raw!r}: must be a number > 0, e.g. 0.01")
        seed = 0
        if (raw := get("OTPRUNE_SEED")) is not None:
            try:
                seed = int(raw)
            except ValueError:
                raise ValueError(f"OTPRUNE_SEED={raw!r}: must be an integer") from None
        order = (get("OTPRUNE_ORDER") or "ascending").lower()
        if order not in KEEP_ORDERS:
            raise ValueError(f"OTPRUNE_ORDER={get('OTPRUNE_ORDER')!r}: must be one of {', '.join(KEEP_ORDERS)}")
        if not model_level and layer is None:
            return cls(method=method, layer=None, ratio=ratio, gamma=gamma, seed=seed, order=order)
        return cls(method=method, layer=layer, ratio=ratio, gamma=gamma, seed=seed, order=order, recipe=recipe)


def _parse_float(name: str, raw: str, allowed: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number; must be {allowed}") from None
    if math.isnan(value):
        raise ValueError(f"{name}={raw!r}: not a number; must be {allowed}")
    return value


def describe_config(config: PruneConfig) -> str:
    """One line saying what a config prunes, e.g. "OTPrune at layer 0, keeping 9.8% of each image's
    visual tokens (gamma 0.01, ascending order)", or that pruning is off."""
    if not config.enabled:
        return "pruning off (no BASELINE / LAYER_INDEX / SUBSET_RATIO set): every visual token goes to the LLM"
    name = DISPLAY_NAMES.get(config.method, config.method)
    where = "before the LLM (layer 0)" if config.layer == 0 else f"at decoder layer {config.layer}"
    if config.method == "vtw":
        what = "withdrawing every visual token"
    elif config.method == "fitprune":
        what = f"following the recipe {config.recipe.source or '<in memory>'}"
    else:
        what = f"keeping {config.ratio:.4g} of each image's visual tokens"
    details = []
    if config.method == "otprune":
        details.append(f"gamma {config.gamma:g}")
    if config.method == "random":
        details.append(f"seed {config.seed}")
    if not config.model_level:
        details.append(f"{config.order} order")
    return f"pruning on: {name} {where}, {what}" + (f" ({', '.join(details)})" if details else "")


LOGGER = logging.getLogger("otprune")


def announce(owner: object, config: PruneConfig, model: str = "model") -> None:
    """Log once per owner (a model or an adapter) which pruning is active, and again when it changes.

    Goes to the `otprune` logger at INFO; when the application has configured no logging at all
    (lmms-eval configures only loguru), a stderr handler is added to that logger first, so the
    line shows up in the run's log.
    """
    key = (config.method, config.layer, config.ratio, config.gamma, config.seed, config.order,
           getattr(config.recipe, "source", None), config.enabled)
    if getattr(owner, "_otprune_announced", None) == key:
        return
    try:
        owner._otprune_announced = key
    except AttributeError:  # an owner without a __dict__: log every time rather than never
        pass
    if not LOGGER.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s | otprune | %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOGGER.addHandler(handler)
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)
    LOGGER.info("%s: %s", model, describe_config(config))


RECORDS_OFF = ("0", "off", "false", "no", "none")


def records_target(environ: Mapping[str, str] | None = None) -> str:
    """`OTPRUNE_RECORDS`, where `otprune.records` writes per-sample records: "auto" when unset or
    empty (beside lmms-eval's outputs when running under lmms-eval with `--output_path`, else
    off), "off" for 0/off/false/no/none, otherwise the path as given (a .jsonl file or a directory)."""
    env = os.environ if environ is None else environ
    value = (env.get("OTPRUNE_RECORDS") or "").strip()
    if not value:
        return "auto"
    return "off" if value.lower() in RECORDS_OFF else value


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank under accelerate / torchrun (`RANK`), 0 when not distributed."""
    env = os.environ if environ is None else environ
    raw = (env.get("RANK") or "0").strip()
    try:
        rank = int(raw)
    except ValueError:
        raise ValueError(f"RANK={raw!r}: must be an integer >= 0 (set by accelerate / torchrun)") from None
    if rank < 0:
        raise ValueError(f"RANK={raw!r}: must be an integer >= 0 (set by accelerate / torchrun)")
    return rank
