"""Pruning configuration, and the one place that reads the environment.

| variable | meaning |
|---|---|
| `BASELINE` | method name (`OURS`/`OTPRUNE`, `DIVPRUNE`, `DPP`, `RANDOM`, `UNIFORM`, `FIRSTK`, `LASTK`, `CDPRUNER`; in the CLIP tower: `PRUMERGE`, `PRUMERGE_PLUS`, `VISIONZIP`; model-level: `FASTV`, `VTW`, `FITPRUNE`, `DART`); default OTPrune |
| `LAYER_INDEX` | where to prune: `0` = the embeddings before the LLM, `L > 0` = the hidden states entering decoder layer L; unset = `0` when `BASELINE` or `SUBSET_RATIO` is set (the paper's default), pruning off when neither is (model-level methods: see below) |
| `SUBSET_RATIO` | fraction of each image's visual tokens to keep, in (0, 1]; or `iqr`: each image keeps the count PruMerge's IQR rule gives it (adaptive budget, layer 0, CLIP towers: `DIVPRUNE` + `iqr` = DivPrune*, `OURS` + `iqr` = OTPrune*); required with `LAYER_INDEX` and with `FASTV`; not used by `VTW` / `FITPRUNE`; `PRUMERGE` / `PRUMERGE_PLUS` default to `iqr` |
| `FITPRUNE_RECIPE` | path of a FitPrune recipe (`otprune fitprune-calibrate`); required with `BASELINE=FITPRUNE` |
| `OTPRUNE_GAMMA` | OTPrune's gamma (default 0.01) |
| `OTPRUNE_SEED` | seed of the random method (default 0) |
| `VISIONZIP_CONTEXTUAL`, `DART_PIVOTS_IMAGE`, `DART_PIVOTS_TEXT`, `CDPRUNER_THETA` | the 2025 baselines' parameters (declared in their files) |
| `CDPRUNER_CLIP` | the full CLIP checkpoint (hub name or folder) whose text tower scores CDPruner's instruction in `otprune.hf` and the vLLM plugin, e.g. `openai/clip-vit-large-patch14-336` for llava-hf's LLaVA-1.5 / 1.6 (their checkpoints hold the vision tower only); our llava uses `mm_vision_tower` |
| `OTPRUNE_ORDER` | `ascending` (default) or `official` (the official code's set order, for exact reproduction) |
| `OTPRUNE_DISTANCE` | per-image distance of the kept tokens in the records (`otprune.distance`): `eq4` (default: the paper's W2, a decreasing function of Eq. 4's objective), `gaussian` (Gaussian W2 with the subset's actual trace), `w2` (exact W2, POT; checked when the switch is read), `off` |
| `TYPE`, `NOT_ADAPTIVE` | the DivPrune repository's PruMerge switches: refused with `BASELINE=PRUMERGE` / `PRUMERGE_PLUS` (and `NOT_ADAPTIVE` with `SUBSET_RATIO=iqr`), naming the switches that ask for the same here (`BASELINE=PRUMERGE_PLUS`, `SUBSET_RATIO=<r>`) |
| `OTPRUNE_COMPILE` | `1`: `select_tokens` runs the selection compiled (`torch.compile(fullgraph=True)`, the batched loop as one graph, CUDA graphs on a GPU); default off (eager; the CPU keeps its host loop) |
| `OTPRUNE_RECORDS` | per-sample FLOPs/latency records (`otprune.eval.records`): unset or `auto` = beside lmms-eval's `--output_path`; `off`; or a `.jsonl` file / a directory |

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

from otprune import methods as registry
from otprune.methods import TokenSelector, get_method
from otprune.methods.prumerge import ADAPTIVE

RATIO_ALLOWED = f"a number in (0, 1], e.g. 0.098, or {ADAPTIVE!r} (PruMerge's adaptive per-image budget)"

KEEP_ORDERS = ("ascending", "official")


def canonical_method(name: str) -> str:
    """The registry name of a method of either kind (selection or inside the LLM)."""
    return registry.canonical(name)


def describe_methods() -> str:
    return registry.describe()


def display_name(method: str | None) -> str:
    """How tables and figures name `method` ("Original" when unpruned)."""
    return registry.display_name(method)


def _check_params(values: Mapping[str, object], env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Every given method parameter checked by the method(s) that take it; ValueError naming the
    parameter (and its environment variable, with its text, when it came from there)."""
    specs = registry.all_params()
    out = {}
    for name, value in values.items():
        if name not in specs:
            raise ValueError(f"{name}={value!r}: not a parameter of any method; known: {', '.join(specs) or 'none'}")
        for cls in (c for c in registry._ALL.values() if any(p.name == name for p in c.params())):
            try:
                cls(**{name: value})
            except (TypeError, ValueError) as err:
                where = f"{specs[name].env}={env[specs[name].env]!r}" if env is not None else f"{name}={value!r}"
                raise ValueError(f"{where}: {err}") from None
        out[name] = value
    return out


@dataclasses.dataclass(frozen=True, init=False)
class PruneConfig:
    """What to prune, where, and how much.

    Attributes:
        method: a selection method of `otprune.METHODS` (aliases and any case accepted), or a
            rule inside the LLM of `otprune.methods.IN_LLM_RULES`: "fastv", "vtw", "fitprune".
        layer: None = pruning off; 0 = prune the visual embeddings before the LLM; L > 0 = prune
            the hidden states entering decoder layer L. Defaults of the rules inside the LLM:
            FastV 2; FitPrune the recipe's first pruning layer; VTW has none (required).
        ratio: fraction of each image's visual tokens to keep, in (0, 1]; or "iqr" (ADAPTIVE):
            each image keeps the count PruMerge's IQR rule on its CLS attention gives (layer 0,
            CLIP towers; DivPrune* / OTPrune*); the merge methods (PruMerge, PruMerge+) default
            to "iqr". Not used by VTW and FitPrune (None for them).
        order: order of the kept tokens handed to the LLM: "ascending" or "official"
            (`LAYER_INDEX=0` only).
        recipe: FitPrune's recipe: a path or an `otprune.methods.fitprune.FitPruneRecipe`
            (loaded and checked here; its layer count is checked against the model at the first
            forward).
        params: method parameters given (e.g. `gamma=0.05`, `seed=3`: keywords of the
            constructor), as sorted (name, value) pairs; `config.gamma` reads one, with the
            method's default when not given. Any registered method's parameter is accepted;
            `method_params()` keeps those the chosen method takes.
    """

    method: str
    layer: int | None
    ratio: float | None
    order: str
    recipe: object
    params: tuple[tuple[str, object], ...]

    def __init__(self, method: str = "otprune", layer: int | None = None, ratio: float | None = None,
                 order: str = "ascending", recipe: object = None, params: Mapping | tuple = (), **kwargs: object) -> None:
        given = dict(params)
        given.update(kwargs)
        given = _check_params(given)
        for name, value in (("method", method), ("layer", layer), ("ratio", ratio), ("order", order),
                            ("recipe", recipe), ("params", tuple(sorted(given.items())))):
            object.__setattr__(self, name, value)
        self._validate()

    def __getattr__(self, name: str) -> object:
        if name.startswith("_") or name in ("method", "layer", "ratio", "order", "recipe", "params"):
            raise AttributeError(name)
        specs = registry.all_params()
        if name not in specs:
            raise AttributeError(f"PruneConfig has no attribute or method parameter {name!r}")
        given = dict(self.params)
        if name in given:
            return given[name]
        owner = self.method_class()
        own = {p.name: p.default for p in owner.params()}
        return own.get(name, specs[name].default)

    def method_class(self):
        return registry.find(self.method)

    def _validate(self) -> None:
        method = canonical_method(self.method)
        object.__setattr__(self, "method", method)
        cls = registry.find(method)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer={self.layer!r}: must be an integer >= 0, or None for no pruning")
        if isinstance(self.ratio, str) and self.ratio.strip().lower() == ADAPTIVE:
            object.__setattr__(self, "ratio", ADAPTIVE)
        if self.ratio is not None and self.ratio != ADAPTIVE and not (
                isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio={self.ratio!r}: must be {RATIO_ALLOWED}")
        if self.adaptive and cls.kind != "merge" and self.layer is not None and (self.layer > 0 or cls.kind == "in_llm"):
            raise ValueError(
                f"ratio={ADAPTIVE!r} (SUBSET_RATIO): the adaptive budget comes from the vision tower's CLS attention and "
                f"applies before the LLM (LAYER_INDEX=0) with a selection or merge method; got method={method!r}, "
                f"layer={self.layer}"
            )
        if cls.kind == "merge":
            if self.recipe is not None:
                raise ValueError(f"recipe: only for method 'fitprune', got method={method!r}")
            if self.layer is not None and self.layer != 0:
                raise ValueError(
                    f"LAYER_INDEX={self.layer}: {cls.label()} merges inside the vision tower, before the LLM; only layer 0"
                )
            if self.ratio is None:
                object.__setattr__(self, "ratio", getattr(cls, "default_ratio", ADAPTIVE))  # VisionZip: None
            uses_ratio = True
        elif cls.kind == "in_llm":
            layer, ratio, recipe = cls().resolve(self.layer, self.ratio, self.recipe)
            for name, value in (("layer", layer), ("ratio", ratio), ("recipe", recipe)):
                object.__setattr__(self, name, value)
            uses_ratio = cls.uses_ratio
        else:
            if self.recipe is not None:
                raise ValueError(f"recipe: only for method 'fitprune', got method={method!r}")
            if getattr(cls, "needs_instruction", False) and self.layer is not None and self.layer > 0:
                raise ValueError(f"LAYER_INDEX={self.layer}: {cls.label()} scores the visual tokens against the instruction "
                                 "before the LLM; only layer 0")
            uses_ratio = True
        if self.layer is not None and self.ratio is None and uses_ratio:
            raise ValueError(f"ratio: required when pruning (layer={self.layer}); give a number in (0, 1]")
        if self.order not in KEEP_ORDERS:
            raise ValueError(f"order={self.order!r}: must be one of {', '.join(KEEP_ORDERS)}")
        if self.order == "official" and self.layer is not None and (self.layer > 0 or cls.kind == "in_llm"):
            raise ValueError(
                f"order='official' (OTPRUNE_ORDER): reproduces the official code's order of the kept tokens before the "
                f"LLM (layer 0) only; at layer {self.layer} the kept tokens keep their positions, use order='ascending'"
            )

    @property
    def enabled(self) -> bool:
        return self.layer is not None

    @property
    def adaptive(self) -> bool:
        """True when each image's budget comes from PruMerge's IQR rule (ratio "iqr")."""
        return self.ratio == ADAPTIVE

    @property
    def merging(self) -> bool:
        """True for the merge methods (PruMerge, PruMerge+), which run inside the vision tower."""
        return registry.find(self.method).kind == "merge"

    @property
    def merge_keeps_all(self) -> bool:
        """True for a merge method at the fixed ratio 1: nothing is dropped, so the LLM gets the model's
        own unpruned visual tokens (no merge, no summary token; the model glue skips the merge)."""
        return self.merging and self.ratio != ADAPTIVE and self.ratio is not None and float(self.ratio) == 1.0

    @property
    def merges_up_to_selected(self) -> bool:
        """True for a merge method that reads the vision tower only up to the layer PRODUCING the
        selected hidden state (VisionZip, `tower_layer = "producing"`): the vLLM plugin runs it,
        since vLLM builds the tower that far (PruMerge reads the next layer, which vLLM does not build)."""
        return self.merging and getattr(self.method_class(), "tower_layer", None) == "producing"

    @property
    def needs_cls_attention(self) -> bool:
        """True when the vision tower must hand over its CLS attention (merge methods, adaptive budgets)."""
        return self.enabled and (self.merging or self.adaptive)

    @property
    def model_level(self) -> bool:
        """True for the rules inside the LLM (FastV, VTW, FitPrune), which prune from attention scores."""
        return registry.find(self.method).kind == "in_llm"

    @property
    def in_llm(self) -> bool:
        """True when pruning happens inside the LLM (layer > 0, or a rule inside the LLM)."""
        return self.enabled and (self.layer > 0 or self.model_level)

    def method_params(self) -> dict[str, object]:
        """The chosen method's parameters with their values (given, else the method's default)."""
        return {spec.name: getattr(self, spec.name) for spec in self.method_class().params()}

    def merger(self):
        """The merge method of this config (PruMerge, PruMerge+); ValueError for the others."""
        if not self.merging:
            raise ValueError(f"method {self.method!r}: not a merge method; merge methods: {registry.describe('merge')}")
        return registry.get_merger(self.method, **self.method_params())

    def selector(self) -> TokenSelector:
        if self.merging:
            raise ValueError(f"method {self.method!r}: merges inside the vision tower (PruMerge), not a selection method")
        if self.model_level:
            raise ValueError(f"method {self.method!r}: a rule inside the LLM (attention scores), "
                             "not a feature-selection method of otprune.METHODS")
        return get_method(self.method, **self.method_params())

    def rule(self):
        """The in-LLM rule of this config: the method's own for FastV / VTW / FitPrune; None for a
        selection method (at `LAYER_INDEX > 0` it runs through `otprune.selection.feature_keep`)."""
        return registry.get_rule(self.method, **self.method_params()) if self.model_level else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PruneConfig:
        """Read `BASELINE`, `LAYER_INDEX`, `SUBSET_RATIO`, `OTPRUNE_ORDER`, `FITPRUNE_RECIPE` and every
        method parameter's variable (`OTPRUNE_GAMMA`, `OTPRUNE_SEED`, ...).

        No `LAYER_INDEX`: layer 0 (the paper's default) when `BASELINE` or `SUBSET_RATIO` is set,
        pruning off when neither is; a rule inside the LLM in `BASELINE` takes its own default
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
        rule = registry.find(method)
        model_level = rule.kind == "in_llm"

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
        if ratio_raw is not None and ratio_raw.lower() == ADAPTIVE:
            ratio = ADAPTIVE
            if model_level:
                raise ValueError(f"SUBSET_RATIO={ratio_raw!r}: the adaptive budget is for the selection and merge methods "
                                 f"before the LLM, not BASELINE={baseline!r}")
        elif ratio_raw is not None:
            ratio = _parse_float("SUBSET_RATIO", ratio_raw, RATIO_ALLOWED)
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"SUBSET_RATIO={ratio_raw!r}: must be {RATIO_ALLOWED}")
        _refuse_divprune_switches(get, baseline, rule.kind == "merge", ratio)
        if rule.kind == "merge" and ratio is None:
            ratio = getattr(rule, "default_ratio", ADAPTIVE)  # PruMerge is adaptive by default; VisionZip needs a ratio
        if layer is None and not model_level and (baseline is not None or ratio is not None):
            layer = 0  # pruning was asked for: the paper's layer
        if model_level and not rule.uses_ratio:
            ratio = None  # VTW keeps no visual token, FitPrune's counts come from its recipe
        elif ratio is None and (layer is not None or model_level):
            why = f"LAYER_INDEX={layer_raw!r}" if layer_raw is not None else f"BASELINE={baseline!r}"
            raise ValueError(
                f"SUBSET_RATIO: not set, but {why} asks for pruning; set SUBSET_RATIO to {RATIO_ALLOWED}"
            )
        recipe = None
        if method == "fitprune":
            recipe = get("FITPRUNE_RECIPE")
            if recipe is None:
                raise ValueError(
                    "FITPRUNE_RECIPE: not set, but BASELINE=FITPRUNE needs a recipe; write one with `otprune "
                    "fitprune-calibrate --model DIR --data FILE.jsonl --reduction 0.6 --out recipe.json`"
                )

        params = {}
        for spec in registry.all_params().values():
            if (raw := get(spec.env)) is not None:
                params[spec.name] = spec.parse(raw)
        params = _check_params(params, {spec.env: get(spec.env) for spec in registry.all_params().values()})
        order = (get("OTPRUNE_ORDER") or "ascending").lower()
        if order not in KEEP_ORDERS:
            raise ValueError(f"OTPRUNE_ORDER={get('OTPRUNE_ORDER')!r}: must be one of {', '.join(KEEP_ORDERS)}")
        if not model_level and layer is None:
            return cls(method=method, layer=None, ratio=ratio, order=order, params=params)
        return cls(method=method, layer=layer, ratio=ratio, order=order, recipe=recipe, params=params)


def _refuse_divprune_switches(get, baseline: str | None, merging: bool, ratio) -> None:
    """The DivPrune repository's PruMerge switches, `TYPE` and `NOT_ADAPTIVE`, are refused where that
    code reads them (with `BASELINE=PRUMERGE` / `PRUMERGE_PLUS`; `NOT_ADAPTIVE` also beside
    `SUBSET_RATIO=iqr`), with the switches that ask for the same here: never silently ignored.

    There, under `BASELINE=PRUMERGE`, `TYPE=PLUS` runs PruMerge+ and any other `TYPE` PruMerge (an
    unset `TYPE` is a KeyError); `NOT_ADAPTIVE=<r>` keeps the int(r N) top-attention patches instead
    of the IQR outliers (plus the summary token; PruMerge+ takes its training path, adding
    int(r N) samples at a stride of int(1 / r) without removing duplicates)."""
    kind, ratio_raw = get("TYPE"), get("NOT_ADAPTIVE")
    if merging and kind is not None:
        if kind.upper() == "PLUS":
            raise ValueError(
                f"TYPE={kind!r} with BASELINE={baseline!r}: the DivPrune repository's switch for PruMerge+; here it is "
                "BASELINE=PRUMERGE_PLUS (unset TYPE)"
            )
        raise ValueError(
            f"TYPE={kind!r} with BASELINE={baseline!r}: TYPE (the DivPrune repository's PruMerge switch) is not read "
            "here; BASELINE=PRUMERGE runs PruMerge, BASELINE=PRUMERGE_PLUS PruMerge+ (unset TYPE)"
        )
    if ratio_raw is not None and (merging or ratio == ADAPTIVE):
        raise ValueError(
            f"NOT_ADAPTIVE={ratio_raw!r}: the DivPrune repository's fixed-ratio PruMerge switch; here it is "
            f"SUBSET_RATIO={ratio_raw} with BASELINE=PRUMERGE or PRUMERGE_PLUS (unset NOT_ADAPTIVE). SUBSET_RATIO=r hands "
            "the LLM at most round(r T) tokens per image, the summary token and PruMerge+'s samples included, where "
            "NOT_ADAPTIVE keeps int(r N) patches plus the summary (PruMerge+: twice as many)"
        )


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
    cls = config.method_class()
    name = cls.label()
    where = "before the LLM (layer 0)" if config.layer == 0 else f"at decoder layer {config.layer}"
    if config.method == "fitprune":
        what = f"following the recipe {config.recipe.source or '<in memory>'}"
    elif config.ratio is None:
        what = "withdrawing every visual token"
    elif config.adaptive:
        what = "keeping per image the count of PruMerge's IQR rule (adaptive budget)"
    else:
        what = f"keeping {config.ratio:.4g} of each image's visual tokens"
    details = [f"{name_} {value:g}" if isinstance(value, float) else f"{name_} {value}"
               for name_, value in config.method_params().items()]
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
    key = (config.method, config.layer, config.ratio, config.params, config.order,
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


def distance_kind(environ: Mapping[str, str] | None = None) -> str:
    """`OTPRUNE_DISTANCE`: which per-image distance of the kept tokens the records carry
    (`otprune.distance`): "eq4" (default when unset or empty), "gaussian", "w2" or "off" (any
    case); "trace" (renamed) is an error that says what it became."""
    from otprune.distance import DEFAULT_DISTANCE, DISTANCE_KINDS, RENAMED

    env = os.environ if environ is None else environ
    raw = (env.get("OTPRUNE_DISTANCE") or "").strip()
    if not raw:
        return DEFAULT_DISTANCE
    if raw.lower() not in DISTANCE_KINDS:
        why = RENAMED.get(raw.lower(), "eq4: the paper's W2 from Eq. 4; gaussian: the actual-trace Gaussian W2; "
                                       "w2: exact W2 with POT")
        raise ValueError(f"OTPRUNE_DISTANCE={raw!r}: must be one of {', '.join(DISTANCE_KINDS)} "
                         f"(default {DEFAULT_DISTANCE}; {why})")
    if raw.lower() == "w2":  # checked where the switch is read (startup), not at the first forward
        import importlib.util

        if importlib.util.find_spec("ot") is None:
            raise ValueError("OTPRUNE_DISTANCE=w2: the exact W2 needs POT (module 'ot'), which is not installed: "
                             f"pip install 'otprune[analysis]', or use OTPRUNE_DISTANCE={DEFAULT_DISTANCE} (the default)")
    return raw.lower()


def cdpruner_clip(environ: Mapping[str, str] | None = None) -> str | None:
    """`CDPRUNER_CLIP`: the full CLIP checkpoint (hub name or folder) whose text tower CDPruner
    scores the instruction with, outside our llava (`otprune.hf.clip_text`); None when unset or empty."""
    env = os.environ if environ is None else environ
    value = (env.get("CDPRUNER_CLIP") or "").strip()
    return value or None


RECORDS_OFF = ("0", "off", "false", "no", "none")
SWITCH_ON = ("1", "on", "true", "yes")


def compile_selection(environ: Mapping[str, str] | None = None) -> bool:
    """`OTPRUNE_COMPILE`: whether `otprune.select_tokens` runs the selection through
    `torch.compile(fullgraph=True)` (the batched loop as one graph; CUDA graphs on a GPU). Off
    when unset or empty (the default: the CPU keeps its host loop); 1/on/true/yes or 0/off/false/no
    (any case), anything else is an error."""
    env = os.environ if environ is None else environ
    raw = (env.get("OTPRUNE_COMPILE") or "").strip()
    if not raw or raw.lower() in RECORDS_OFF:
        return False
    if raw.lower() in SWITCH_ON:
        return True
    raise ValueError(f"OTPRUNE_COMPILE={raw!r}: must be 1 (compile the selection) or 0 (eager, the default); "
                     f"accepted: {', '.join(SWITCH_ON + RECORDS_OFF)}")


def check_fixed_selection(config: PruneConfig, who: str, instead: str, producing_merges: bool = False) -> PruneConfig:
    """`config`, when it prunes nothing or keeps a fixed fraction of each image's embeddings before the
    LLM with a selection method (`otprune.METHODS`); ValueError naming the switch, its value and what
    `who` accepts otherwise: pruning inside the LLM (`check_before_llm`), the merge methods
    (PRUMERGE, PRUMERGE_PLUS: they merge inside the vision tower; with `producing_merges`, those
    reading the tower only up to the selected hidden state, VisionZip, are accepted at a fixed ratio)
    and the adaptive budget (`SUBSET_RATIO=iqr`: it needs the tower's CLS attention). `instead`: what runs those."""
    check_before_llm(config, who, "our llava package (lmms-eval's --model llava): it alone prunes inside the LLM")
    if not config.enabled:
        return config
    allowed = f"selection methods: {registry.describe('selection')}, at SUBSET_RATIO in (0, 1]"
    if producing_merges:
        producing = [m.upper() for m in registry.MERGERS if getattr(registry.MERGERS[m], "tower_layer", None) == "producing"]
        allowed += f"; merge methods: {', '.join(producing)}"
    if config.merging and not (producing_merges and config.merges_up_to_selected):
        raise ValueError(
            f"{who}: BASELINE={config.method.upper()}: {config.method_class().label()} merges tokens inside the vision "
            f"tower, which {who} does not support (yet); it runs {allowed}; for {config.method.upper()} use {instead}"
        )
    if config.adaptive:
        raise ValueError(
            f"{who}: SUBSET_RATIO={ADAPTIVE!r} (PruMerge's adaptive per-image budget, from the vision tower's CLS "
            f"attention) is not supported by {who} (yet); give a fixed ratio, e.g. SUBSET_RATIO=0.098 ({allowed}), "
            f"or use {instead}"
        )
    return config


def check_before_llm(config: PruneConfig, who: str, instead: str) -> PruneConfig:
    """`config`, when it prunes before the LLM or not at all; ValueError naming the switches and the
    allowed values when it prunes inside the LLM (`LAYER_INDEX` > 0, FASTV, VTW, FITPRUNE), which
    `who` (e.g. "otprune vLLM plugin") cannot do; `instead`: what can."""
    if config.enabled and config.in_llm:
        raise ValueError(
            f"{who}: BASELINE={config.method.upper()} LAYER_INDEX={config.layer}: prunes each image's embeddings "
            "before the LLM only (LAYER_INDEX=0 or unset, with a selection method: OURS/OTPRUNE, DIVPRUNE, DPP, "
            f"RANDOM, UNIFORM, FIRSTK, LASTK); pruning inside the LLM needs {instead}"
        )
    return config


def records_target(environ: Mapping[str, str] | None = None) -> str:
    """`OTPRUNE_RECORDS`, where `otprune.eval.records` writes per-sample records: "auto" when unset,
    empty or `auto` (beside lmms-eval's outputs when running under lmms-eval with `--output_path`,
    else off), "off" for 0/off/false/no/none, otherwise the path as given (a .jsonl file or a directory)."""
    env = os.environ if environ is None else environ
    value = (env.get("OTPRUNE_RECORDS") or "").strip()
    if not value or value.lower() == "auto":
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


RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"


def run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """`OTPRUNE_RUN_ID`: the id run_OTPrune.sh gives each lmms-eval call (written into every record and into
    its run folder; every record carries it); None when unset."""
    import re

    env = os.environ if environ is None else environ
    value = (env.get("OTPRUNE_RUN_ID") or "").strip()
    if not value:
        return None
    if not re.fullmatch(RUN_ID_PATTERN, value):
        raise ValueError(
            f"OTPRUNE_RUN_ID={value!r}: must be 1-128 characters of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit), e.g. 20250101_120000_3f9a2c1e"
        )
    return value
