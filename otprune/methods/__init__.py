"""The registry of token-selection methods: one file per method, names case-insensitive."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from otprune.methods.base import TokenSelector
from otprune.methods.divprune import DivPrune
from otprune.methods.dpp import DPP
from otprune.methods.first_k import FirstK
from otprune.methods.last_k import LastK
from otprune.methods.otprune import OTPrune
from otprune.methods.random import RandomSelect
from otprune.methods.uniform import Uniform


class MethodRegistry(Mapping[str, type[TokenSelector]]):
    """name -> method class. Lookups ignore case and accept aliases (`OURS` -> `otprune`)."""

    def __init__(self, classes: list[type[TokenSelector]]) -> None:
        self._classes = {cls.name: cls for cls in classes}
        self._names = {cls.name: cls.name for cls in classes}
        for cls in classes:
            self._names.update({alias: cls.name for alias in cls.aliases})

    def canonical(self, name: str) -> str:
        """The registry name for `name` (any case, aliases allowed); ValueError if unknown."""
        key = str(name).strip().lower()
        if key not in self._names:
            raise ValueError(f"unknown selection method {name!r}; valid names: {self.describe()}")
        return self._names[key]

    def describe(self) -> str:
        return ", ".join(
            name + (f" (aliases: {', '.join(a.upper() for a in cls.aliases)})" if cls.aliases else "")
            for name, cls in self._classes.items()
        )

    def __getitem__(self, name: str) -> type[TokenSelector]:
        try:
            return self._classes[self.canonical(name)]
        except ValueError as err:
            raise KeyError(str(err)) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


METHODS = MethodRegistry([OTPrune, DivPrune, DPP, RandomSelect, Uniform, FirstK, LastK])


def get_method(name: str, **params: object) -> TokenSelector:
    """Instantiate method `name` with its parameters; unknown names or parameters -> ValueError."""
    cls = METHODS[name] if name in METHODS else None
    if cls is None:
        METHODS.canonical(name)  # raises the message listing the valid names
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"method {cls.name!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    return cls(**params)


def method_parameters(name: str) -> tuple[str, ...]:
    """The parameter names of method `name`."""
    return tuple(f.name for f in dataclasses.fields(METHODS[name]))


__all__ = [
    "DPP",
    "METHODS",
    "DivPrune",
    "FirstK",
    "LastK",
    "MethodRegistry",
    "OTPrune",
    "RandomSelect",
    "TokenSelector",
    "Uniform",
    "get_method",
    "method_parameters",
]
