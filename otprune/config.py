"""Pruning configuration, and the one place that reads the environment.

| variable | meaning |
|---|---|
| `BASELINE` | method name (`OURS`/`OTPRUNE`, `DIVPRUNE`, `DPP`, `RANDOM`, `UNIFORM`, `FIRSTK`, `LASTK`); default OTPrune |
| `LAYER_INDEX` | where to prune: `0` = the embeddings before the LLM; unset = pruning off |
| `SUBSET_RATIO` | fraction of each image's visual tokens to keep, in (0, 1]; required with `LAYER_INDEX` |
| `OTPRUNE_GAMMA` | OTPrune's gamma (default 0.01) |
| `OTPRUNE_SEED` | seed of the random method (default 0) |
| `OTPRUNE_ORDER` | `ascending` (default) or `official` (the official code's set order, for exact reproduction) |
| `OTPRUNE_RECORDS` | per-sample FLOPs/latency records (`otprune.records`): unset = beside lmms-eval's `--output_path`; `off`; or a `.jsonl` file / a directory |
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

from otprune.methods import METHODS, TokenSelector, get_method, method_parameters

KEEP_ORDERS = ("ascending", "official")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune, where, and how much.

    Attributes:
        method: registry name of the selection method (aliases and any case accepted).
        layer: None = pruning off; 0 = prune the visual embeddings before the LLM.
        ratio: fraction of each image's visual tokens to keep, in (0, 1].
        gamma: OTPrune's kernel weight in L = I + gamma * S S^T.
        seed: seed of the random method.
        order: order of the kept tokens handed to the LLM: "ascending" or "official".
    """

    method: str = "otprune"
    layer: int | None = None
    ratio: float | None = None
    gamma: float = 0.01
    seed: int = 0
    order: str = "ascending"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", METHODS.canonical(self.method))
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"layer={self.layer!r}: must be an integer >= 0, or None for no pruning")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio={self.ratio!r}: must be a number in (0, 1]")
        if self.layer is not None and self.ratio is None:
            raise ValueError(f"ratio: required when pruning (layer={self.layer}); give a number in (0, 1]")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma={self.gamma!r}: must be a finite number > 0")
        if self.order not in KEEP_ORDERS:
            raise ValueError(f"order={self.order!r}: must be one of {', '.join(KEEP_ORDERS)}")

    @property
    def enabled(self) -> bool:
        return self.layer is not None

    def method_params(self) -> dict[str, object]:
        """The config values that the chosen method takes as parameters (gamma, seed, ...)."""
        names = method_parameters(self.method)
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def selector(self) -> TokenSelector:
        return get_method(self.method, **self.method_params())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PruneConfig:
        """Read `BASELINE`, `LAYER_INDEX`, `SUBSET_RATIO`, `OTPRUNE_GAMMA`, `OTPRUNE_SEED`, `OTPRUNE_ORDER`.

        No `LAYER_INDEX`: pruning off. Any malformed value raises ValueError naming the
        variable, its value and what is allowed: asking for pruning never silently yields an
        unpruned run.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return None if value is None or value.strip() == "" else value.strip()

        baseline = get("BASELINE")
        try:
            method = METHODS.canonical(baseline) if baseline is not None else "otprune"
        except ValueError:
            raise ValueError(f"BASELINE={baseline!r}: unknown method; valid: {METHODS.describe()}") from None

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
        if layer is not None and ratio is None:
            raise ValueError(
                f"SUBSET_RATIO: not set, but LAYER_INDEX={layer_raw!r} asks for pruning; "
                "set SUBSET_RATIO to a number in (0, 1], e.g. 0.098"
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
        return cls(method=method, layer=layer, ratio=ratio, gamma=gamma, seed=seed, order=order)


def _parse_float(name: str, raw: str, allowed: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number; must be {allowed}") from None
    if math.isnan(value):
        raise ValueError(f"{name}={raw!r}: not a number; must be {allowed}")
    return value


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
