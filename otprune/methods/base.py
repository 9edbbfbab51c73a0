"""The interfaces every pruning method implements, and small shared tensor helpers.

A method is one file in `otprune/methods/`: a dataclass whose fields are its parameters, which
owns its name, aliases, display name and place in tables (`Method`), registered in
`otprune.methods.REGISTRY`. Two kinds:

- `TokenSelector` (selection): sees a padded batch of features and returns, per sample, the
  indices it keeps in the order it picked them. Everything that is not specific to one method
  (argument checks, dtype handling, ragged lengths, sorting) lives in
  `otprune.selection.select_tokens`.
- `TokenMerger` (merge, PruMerge): runs inside the vision tower on the CLS attention and the
  patch keys of one layer and returns new tokens (a variable number per image) with, per row,
  the patch it stands for (`otprune.methods.prumerge`).
- `InLLMRule` (inside the LLM): decides, at a decoder layer, which visual tokens stay, from what
  the model computes there (attention rows, hidden states); the model side hands it a
  `StageContext` (see `otprune.methods.in_llm`).

A parameter is a dataclass field; `param()` attaches how the environment, run folders and
tables name it (`OTPRUNE_GAMMA`, `_g0.05`, `γ=0.05`), so configs, records and reports carry
every method's parameters without naming them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor


def param(default: Any, *, env: str, tag: str, label: str | None = None, kind: type = float, doc: str = "") -> Any:
    """A method parameter: a dataclass field with its environment variable (`env`), the short
    `tag` of run-folder names (`_<tag><value>`), its `label` in tables and its value `kind`."""
    meta = {"env": env, "tag": tag, "label": label or tag, "kind": kind, "doc": doc}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one method parameter is named and parsed (from a `param()` field)."""

    name: str
    default: Any
    env: str
    tag: str
    label: str
    kind: type
    doc: str

    def parse(self, raw: str) -> Any:
        """The environment's text as a value, or ValueError naming the variable."""
        what = "an integer" if self.kind is int else "a number"
        try:
            value = self.kind(raw)
        except ValueError:
            raise ValueError(f"{self.env}={raw!r}: must be {what}" + (f" ({self.doc})" if self.doc else "")) from None
        if isinstance(value, float) and value != value:
            raise ValueError(f"{self.env}={raw!r}: not a number; must be {what}")
        return value


@dataclasses.dataclass
class Method:
    """What every pruning method declares (class attributes), beside its parameters (fields).

    name: the registry name (lower case); aliases: other accepted names (`OURS` for OTPrune);
    display_name: how tables and figures name it; table_rank: its row position in tables
    (ascending; the paper lists the baselines first and OTPrune last).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    display_name: ClassVar[str] = ""
    table_rank: ClassVar[int] = 50
    kind: ClassVar[str] = ""

    @classmethod
    def params(cls) -> tuple[ParamSpec, ...]:
        """The method's parameters that the environment, records and tables know (`param()` fields)."""
        return tuple(
            ParamSpec(f.name, f.default, f.metadata["env"], f.metadata["tag"], f.metadata["label"],
                      f.metadata["kind"], f.metadata["doc"])
            for f in dataclasses.fields(cls)
            if "env" in f.metadata
        )

    @classmethod
    def label(cls) -> str:
        return cls.display_name or cls.name


@dataclasses.dataclass
class TokenSelector(Method):
    """Base class of the selection methods.

    Subclasses are dataclasses whose fields are the method's parameters, and implement
    `select`. They must not synchronise with a device inside their loops (no `.item()`, no
    `.tolist()`, no Python branching on tensor values), so that a whole selection can be
    captured by `torch.compile(fullgraph=True)` and queued on a GPU without stalls. (A CPU
    tensor has no device to wait for: `otprune.methods._greedy.greedy_host` reads its picks
    on the host.)
    """

    kind: ClassVar[str] = "selection"
    checks_finite: ClassVar[bool] = False
    """True if `select` raises `check_finite`'s error itself, from a pass over the features it
    makes anyway; `select_tokens` then skips its own pass."""

    def official_order(self, picks: list[int]) -> list[int]:
        """The kept tokens, given in pick order, in the order the method's official code hands them
        to the LLM (`OTPRUNE_ORDER=official`, for exact reproduction of published runs).

        Default: ascending token order (DivPrune's code sorts its kept indices; the other
        baselines have no official order of their own). OTPrune overrides it with its code's
        set order.
        """
        return sorted(int(i) for i in picks)

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        """Pick tokens.

        Args:
            features: (B, N, D) in the compute dtype (fp32, or fp64 for fp64 input); rows at
                positions >= lengths[b] are padding and are zero.
            lengths: (B,) long, valid tokens per sample, 1 <= lengths[b] <= N.
            k: (B,) long, tokens to keep per sample, 1 <= k[b] <= lengths[b].
            k_max: int, max(k) (a Python int so that the loop length is static).

        Returns:
            (B, k_max) long: sample b's picks in selection order in its first k[b] slots,
            -1 in the rest (also when k_max exceeds lengths[b]: `mask_beyond_k`).
        """
        raise NotImplementedError


@dataclasses.dataclass
class TokenMerger(Method):
    """Base class of the merge methods (PruMerge): they see what the vision tower computes at one
    layer (the CLS query, the patch keys) beside the patch features, and return NEW tokens, a
    variable number per image, each with the index of the patch it stands for (`MergeResult`
    of `otprune.methods.prumerge`). They run inside the vision tower, before the projector, at
    `LAYER_INDEX=0` only; `ratio` is a fixed ratio or "iqr" (the adaptive default)."""

    kind: ClassVar[str] = "merge"

    def merge(self, features: Tensor, q_cls: Tensor, keys: Tensor, ratio, order: str = "ascending"):
        """features: (B, N, D) patches of B crops; q_cls: (B, C); keys: (B, 1 + N, C) -> MergeResult."""
        raise NotImplementedError


def valid_mask(lengths: Tensor, n: int) -> Tensor:
    """(B,) lengths -> (B, N) bool, True at real (non-padding) positions."""
    return torch.arange(n, device=lengths.device) < lengths[:, None]


NOT_FINITE = "features: contain NaN or Inf; selection on them would be arbitrary"


def check_finite(features: Tensor) -> None:
    """ValueError if features hold a NaN or an Inf (one host read)."""
    # One cheap pass: a NaN or Inf makes the sum non-finite (an overflowing sum of huge finite
    # values is told apart by the exact check).
    if not bool(torch.isfinite(features.sum())) and not bool(torch.isfinite(features).all()):
        raise ValueError(NOT_FINITE)


def mask_beyond_k(picks: Tensor, k: Tensor) -> Tensor:
    """Set slots t >= k[b] of picks: (B, k_max) to -1."""
    slot = torch.arange(picks.shape[1], device=picks.device)
    return picks.masked_fill(slot >= k[:, None], -1)


def flat_rows(matrix: Tensor):
    """A `kernel_row` for the greedy: (j, flat) -> matrix[b, j[b], :] for matrix: (B, N, M)."""
    rows = matrix.reshape(-1, matrix.shape[-1])  # (B * N, M), a view for contiguous input
    return lambda j, flat: rows.index_select(0, flat)
