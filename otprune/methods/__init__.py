"""The registry of pruning methods: one file per method, names case-insensitive.

`REGISTRY` holds every method of both kinds (`TokenSelector`: selection; `InLLMRule`: inside
the LLM); `METHODS` and `IN_LLM_RULES` are its two views. A new method is one file (a dataclass
with `name`, `aliases`, `display_name`, `table_rank` and its `param()` fields) plus one line in
`_BUILTIN` below, or `register_method(cls)` from outside the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from otprune.methods.base import Method, ParamSpec, TokenMerger, TokenSelector, param
from otprune.methods.cdpruner import CDPruner
from otprune.methods.dart import DART
from otprune.methods.divprune import DivPrune
from otprune.methods.dpp import DPP
from otprune.methods.fastv import FastV
from otprune.methods.first_k import FirstK
from otprune.methods.fitprune import FitPrune
from otprune.methods.in_llm import InLLMRule
from otprune.methods.last_k import LastK
from otprune.methods.otprune import OTPrune
from otprune.methods.prumerge import PruMerge, PruMergePlus
from otprune.methods.random import RandomSelect
from otprune.methods.uniform import Uniform
from otprune.methods.visionzip import VisionZip
from otprune.methods.vtw import VTW

_ALL: dict[str, type[Method]] = {}  # name -> class, both kinds, in registration order
_NAMES: dict[str, str] = {}  # name or alias -> name


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method class (usable as a decorator). Its name and aliases must be new."""
    if not (isinstance(cls, type) and issubclass(cls, (TokenSelector, TokenMerger, InLLMRule)) and cls.name):
        raise ValueError(f"register_method: {cls!r} must be a TokenSelector, TokenMerger or InLLMRule subclass with a `name`")
    keys = [cls.name.lower(), *(a.lower() for a in cls.aliases)]
    taken = [key for key in keys if key in _NAMES and _ALL[_NAMES[key]] is not cls]
    if taken:
        raise ValueError(f"register_method: name(s) {taken} of {cls.__name__} are already registered")
    _ALL[cls.name.lower()] = cls
    _NAMES.update(dict.fromkeys(keys, cls.name.lower()))
    return cls


def unregister_method(name: str) -> None:
    """Remove a method added with `register_method` (tests)."""
    cls = _ALL.pop(canonical(name))
    for key in [k for k, v in _NAMES.items() if v == cls.name.lower()]:
        del _NAMES[key]


def canonical(name: str, kind: str | None = None) -> str:
    """The registry name for `name` (any case, aliases allowed), of `kind` ("selection" / "in_llm")
    when given; ValueError listing the valid names if unknown."""
    key = str(name).strip().lower()
    found = _NAMES.get(key)
    if found is None or (kind is not None and _ALL[found].kind != kind):
        what = {"in_llm": "", "merge": "merge "}.get(kind or "", "selection ")
        raise ValueError(f"unknown {what}method {name!r}; valid names: {describe(kind)}")
    return found


def find(name: str) -> type[Method]:
    """The method class of any kind for `name` (any case, aliases)."""
    return _ALL[canonical(name)]


def describe(kind: str | None = None) -> str:
    def one(cls: type[Method]) -> str:
        return cls.name + (f" (aliases: {', '.join(a.upper() for a in cls.aliases)})" if cls.aliases else "")

    selection = ", ".join(one(c) for c in _ALL.values() if c.kind == "selection")
    if kind == "selection":
        return selection
    in_llm = ", ".join(one(c) for c in _ALL.values() if c.kind == "in_llm")
    merge = ", ".join(one(c) for c in _ALL.values() if c.kind == "merge")
    if kind in ("in_llm", "merge"):
        return in_llm if kind == "in_llm" else merge
    return f"{selection}; merging in the vision tower: {merge}; inside the LLM: {in_llm}"


def all_params() -> dict[str, ParamSpec]:
    """Every registered method's parameters by name (the first registration of a name wins)."""
    out: dict[str, ParamSpec] = {}
    for cls in _ALL.values():
        for spec in cls.params():
            out.setdefault(spec.name, spec)
    return out


def display_name(name: str | None) -> str:
    """How tables name a method ("Original" for None, the name itself when unknown)."""
    if name is None:
        return "Original"
    key = str(name).strip().lower()
    return _ALL[_NAMES[key]].label() if key in _NAMES else str(name)


def table_rank(name: str | None) -> int:
    """A method's row position in tables: unpruned first, then by `table_rank`, unknown last."""
    if name is None:
        return -1
    key = str(name).strip().lower()
    return _ALL[_NAMES[key]].table_rank if key in _NAMES else 10**6


class MethodRegistry(Mapping[str, type[Method]]):
    """A live view of the registry: name -> method class of one kind. Lookups ignore case and
    accept aliases (`OURS` -> `otprune`)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def canonical(self, name: str) -> str:
        return canonical(name, self.kind)

    def describe(self) -> str:
        return describe(self.kind)

    def __getitem__(self, name: str) -> type[Method]:
        try:
            return _ALL[self.canonical(name)]
        except ValueError as err:
            raise KeyError(str(err)) from None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        found = _NAMES.get(name.strip().lower())
        return found is not None and _ALL[found].kind == self.kind

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, cls in _ALL.items() if cls.kind == self.kind])

    def __len__(self) -> int:
        return sum(cls.kind == self.kind for cls in _ALL.values())


_BUILTIN = [OTPrune, DivPrune, DPP, RandomSelect, Uniform, FirstK, LastK, FastV, VTW, FitPrune, PruMerge, PruMergePlus]
_BUILTIN += [CDPruner, DART, VisionZip]  # the baselines of 2025 (issue 25)
for _cls in _BUILTIN:
    register_method(_cls)

METHODS = MethodRegistry("selection")  # the selection methods (`select_tokens`)
IN_LLM_RULES = MethodRegistry("in_llm")  # the rules that prune inside the LLM
MERGERS = MethodRegistry("merge")  # the methods that merge inside the vision tower (PruMerge)


def get_method(name: str, **params: object) -> TokenSelector:
    """Instantiate selection method `name` with its parameters; unknown names or parameters -> ValueError."""
    cls = _ALL[canonical(name, "selection")]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"method {cls.name!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    return cls(**params)


def get_merger(name: str, **params: object) -> TokenMerger:
    """Instantiate merge method `name` (PruMerge, PruMerge+) with its parameters."""
    cls = _ALL[canonical(name, "merge")]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"method {cls.name!r} got unknown parameter(s) {unknown}; allowed: {', '.join(sorted(fields)) or 'none'}")
    return cls(**params)


def get_rule(name: str, **params: object) -> InLLMRule:
    """Instantiate the in-LLM rule `name` (with its `param()` parameters, e.g. DART's pivots)."""
    return _ALL[canonical(name, "in_llm")](**params)


def method_parameters(name: str) -> tuple[str, ...]:
    """The names of method `name`'s `param()` parameters (e.g. ("gamma",) for OTPrune)."""
    return tuple(spec.name for spec in find(name).params())


__all__ = [
    "CDPruner", "DART", "DPP", "IN_LLM_RULES", "MERGERS", "METHODS", "VTW", "PruMerge", "PruMergePlus", "TokenMerger", "get_merger", "DivPrune", "FastV", "FirstK", "FitPrune", "InLLMRule", "LastK",
    "Method", "MethodRegistry", "OTPrune", "ParamSpec", "RandomSelect", "TokenSelector", "Uniform", "VisionZip", "all_params",
    "canonical", "describe", "display_name", "find", "get_method", "get_rule", "method_parameters", "param",
    "register_method", "table_rank", "unregister_method",
]
