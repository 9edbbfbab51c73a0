"""The pruning settings of a `run_OTPrune.sh` run: what its `--methods/--ratios/--layers/...` expand to.

`python -m otprune.eval.runplan METHODS RATIOS LAYERS LAYERS_GIVEN FASTV_LAYERS VTW_LAYERS RECIPE
RATIOS_GIVEN GAMMAS` (the script's option values; LAYERS_GIVEN / RATIOS_GIVEN are 1 when the user
gave them) prints one line per setting, tab-separated: run-folder tag, method, layer, the
setting's fields (JSON), then the run's VAR=value switches. "none" is the unpruned model; a
feature-selection method runs at every ratio x layer; FASTV at every ratio x its layers; VTW at its
layers (no ratio); FITPRUNE with its recipe; DIVPRUNE_STAR / OURS_STAR and PruMerge with the
per-image IQR budget (`--gammas`: OTPrune once per gamma). Each setting is checked by otprune's own
parser of the switches (`PruneConfig.from_env`, the code the model runs) and named by
`otprune.eval.records.settings_tag`; each is printed once. The method parameters (OTPRUNE_GAMMA,
OTPRUNE_SEED, ...) and OTPRUNE_ORDER come from this process's environment.

A choice that cannot run exits with status 1 and a message naming the script's option.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

from otprune.config import PruneConfig, canonical_method, describe_methods
from otprune.eval.records import result_settings, settings_tag
from otprune.methods import IN_LLM_RULES, find

ME = "run_OTPrune.sh"
UNPRUNED = ("none", "original", "off", "")
# The adaptive rows of Table 1: DivPrune* / OTPrune* (DivPrune's / OTPrune's selection with
# PruMerge's per-image IQR count: SUBSET_RATIO=iqr), at layer 0.
STARS = {"divprune_star": "DIVPRUNE", "divprune*": "DIVPRUNE", "ours_star": "OURS", "otprune_star": "OURS",
         "otprune*": "OURS", "ours*": "OURS"}  # fmt: skip


class PlanError(Exception):
    """A choice run_OTPrune.sh cannot run; the message names the option."""


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _is_otprune(name: str) -> bool:
    try:
        return canonical_method(name) == "otprune"
    except ValueError:  # unknown: reported with the valid names when the settings reach it
        return False


def _is_zero(layer: str) -> bool:
    return layer.isdigit() and int(layer) == 0


def plan_settings(
    methods: str, ratios: str, layers: str, layers_given: bool, fastv_layers: str, vtw_layers: str, recipe: str,
    ratios_given: bool, gammas: str, environ: dict[str, str] | None = None,
) -> Iterator[str]:  # fmt: skip
    """The settings' lines (see the module doc), each setting once; PlanError on a bad choice."""
    environ = os.environ if environ is None else environ
    seen: set[str] = set()

    def layers_of(method: str) -> list[str | None]:
        """A method's layers: its own flag, else the given --layers it can use, else its default."""
        if method == "fitprune":
            return [None]  # the recipe's
        if method not in IN_LLM_RULES:
            return _split(layers)
        own = {"fastv": fastv_layers, "vtw": vtw_layers}.get(method, "")
        if own:
            return _split(own)
        usable = [layer for layer in _split(layers) if not _is_zero(layer)] if layers_given else []
        if usable:
            return usable
        if find(method).default_layer is not None:
            return [str(find(method).default_layer)]
        raise PlanError(
            f"--methods {method.upper()}: {method.upper()} withdraws the visual tokens at a layer L >= 1 and has no "
            f"default layer (it depends on the model); give it with --vtw-layers L (or --layers L)"
        )

    def emit(name: str, method: str, ratio: str | None, layer: str | None, baseline: str | None = None,
             overrides: dict[str, str] | None = None) -> Iterator[str]:  # fmt: skip
        env = {"BASELINE": baseline or name}
        if layer is not None:
            env["LAYER_INDEX"] = layer
        if ratio is not None:
            env["SUBSET_RATIO"] = ratio
        for spec in find(method).params():  # the method's own parameters (OTPRUNE_GAMMA, OTPRUNE_SEED, ...)
            if environ.get(spec.env, "").strip():
                env[spec.env] = environ[spec.env].strip()
        env.update(overrides or {})  # --gammas
        order = environ.get("OTPRUNE_ORDER", "").strip()
        if method not in IN_LLM_RULES and layer is not None and _is_zero(layer) and order:
            env["OTPRUNE_ORDER"] = order
        if method == "fitprune" and recipe:
            env["FITPRUNE_RECIPE"] = recipe
        try:
            config = PruneConfig.from_env(env)
        except (ValueError, OSError) as err:
            raise PlanError(str(err)) from None
        settings = result_settings(config)
        tag = settings_tag(settings, name)
        key = json.dumps(settings, sort_keys=True)  # one run per setting, whatever it is called (OURS, OTPRUNE)
        if key in seen:
            return
        seen.add(key)
        info = json.dumps({**settings, "baseline": name})[1:-1]
        yield "\t".join([tag, settings["method"], str(settings["layer"]), info, *[f"{k}={v}" for k, v in env.items()]])

    names = [name.strip() for name in methods.split(",")]
    gamma_list = _split(gammas)
    if gamma_list and not any(_is_otprune(n) for n in names if n.lower() not in UNPRUNED and n.lower() not in STARS):
        raise PlanError(f"--gammas {gammas}: only OTPrune (OURS) takes gamma; add OURS to --methods")
    for name in names:
        if name.lower() in UNPRUNED:
            if "original" not in seen:
                seen.add("original")
                yield "\t".join(["original", "-", "-", json.dumps({**result_settings(None), "baseline": None})[1:-1]])
            continue
        if name.lower() in STARS:
            base = STARS[name.lower()]
            yield from emit(name.replace("*", "_star"), canonical_method(base), "iqr", "0", base)
            continue
        try:
            method = canonical_method(name)
        except ValueError:
            raise PlanError(
                f"BASELINE={name!r}: unknown method; valid: {describe_methods()}; adaptive rows: DIVPRUNE_STAR, OURS_STAR"
            ) from None
        if method in ("prumerge", "prumerge_plus"):  # adaptive (Table 1), or every given ratio (--ratios)
            for ratio in _split(ratios) if ratios_given else ["iqr"]:
                yield from emit(name, method, ratio, "0")
            continue
        for ratio in [None] if method in IN_LLM_RULES and not find(method).uses_ratio else _split(ratios) or [""]:
            for layer in layers_of(method):
                for gamma in gamma_list if method == "otprune" and gamma_list else [None]:
                    yield from emit(name, method, ratio, layer, overrides={"OTPRUNE_GAMMA": gamma} if gamma else None)


USAGE = (f"usage: python -m otprune.eval.runplan METHODS RATIOS LAYERS LAYERS_GIVEN FASTV_LAYERS VTW_LAYERS RECIPE "
         f"RATIOS_GIVEN GAMMAS\n(the settings of {ME}; see this module's docstring)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 9:
        print(USAGE, file=sys.stderr)
        return 2
    methods, ratios, layers, layers_given, fastv, vtw, recipe, ratios_given, gammas = args
    try:
        for line in plan_settings(methods, ratios, layers, layers_given == "1", fastv, vtw, recipe, ratios_given == "1",
                                  gammas):  # fmt: skip
            print(line)
    except PlanError as err:
        print(f"{ME}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
