"""What one sample's multimodal prefill did: `SampleStats`, the same for our `llava` model
(`model.pruning_stats`) and for `otprune.hf`'s adapters (`adapter.last_stats`).

Records (`otprune.eval.records`) and reports read these fields; method parameters travel in
`params` and appear flat (`gamma`, `seed`, ...) when read as a mapping, so a new method's
parameter needs no new field here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence


@dataclasses.dataclass
class SampleStats(Mapping):
    """One sample's prefill.

    method / layer / ratio / order / recipe: what ran (None when pruning is off; recipe: FitPrune's
    file); params: the method's parameters ({} when off); image_tokens_before / _after: per image
    (or video) of the sample, its visual tokens before and after pruning; text_tokens: the
    non-visual, non-padding tokens; batch_size: samples in the forward; select_ms / prefill_ms:
    the batch's selection time and prefill wall time; peak_memory_mb: the accelerator's peak
    allocated memory during the batch's prefill (CUDA; None on a CPU, see `otprune.timing.Clock`);
    visual_tokens_per_layer: the sample's
    visual tokens at each decoder layer's input (the schedule; multi-layer for in-LLM methods);
    distance_kind / distance / objective / distance_ms: per image, the distance between its kept
    tokens and all its tokens on the features the selection saw (`otprune.distance`,
    `OTPRUNE_DISTANCE`: eq4 = the paper's W2, gaussian = actual-trace Gaussian W2, w2 = exact W2), the Eq. 4 objective, and
    the batch's time computing them (never part of select_ms / prefill_ms); None when off or not
    defined (unpruned, merged tokens, VTW, FitPrune's multi-stage schedule).
    """

    method: str | None
    layer: int | None
    ratio: float | None
    order: str | None
    params: dict[str, object]
    image_tokens_before: list[int]
    image_tokens_after: list[int]
    text_tokens: int
    batch_size: int
    visual_tokens_per_layer: list[int]
    recipe: str | None = None
    select_ms: float | None = None
    prefill_ms: float | None = None
    peak_memory_mb: float | None = None
    distance_kind: str | None = None
    distance: list[float | None] | None = None
    objective: list[float | None] | None = None
    distance_ms: float | None = None

    @classmethod
    def of(cls, config, before: Sequence[int], schedules: Sequence[Sequence[int]], text_tokens: int,
           batch_size: int) -> SampleStats:
        """The stats of a sample whose images had `before[i]` tokens and saw `schedules[i][l]` at
        decoder layer l, under `config` (an `otprune.PruneConfig`; off -> method None)."""
        on = config.enabled
        layers = len(schedules[0]) if schedules else 0
        return cls(
            method=config.method if on else None,
            layer=config.layer,
            ratio=config.ratio if on else None,
            order=config.order if on else None,
            params=config.method_params() if on else {},
            image_tokens_before=[int(t) for t in before],
            image_tokens_after=[int(s[-1]) for s in schedules],
            text_tokens=int(text_tokens),
            batch_size=int(batch_size),
            visual_tokens_per_layer=[sum(int(s[layer]) for s in schedules) for layer in range(layers)],
            recipe=(getattr(config.recipe, "source", None) or None) if on else None,
        )

    @property
    def images(self) -> int:
        return len(self.image_tokens_before)

    @property
    def visual_tokens_before(self) -> int:
        return sum(self.image_tokens_before)

    @property
    def visual_tokens_after(self) -> int:
        return sum(self.image_tokens_after)

    @property
    def seq_len_before(self) -> int:
        return self.text_tokens + self.visual_tokens_before

    @property
    def seq_len_after(self) -> int:
        return self.text_tokens + self.visual_tokens_after

    @property
    def tokens_per_layer(self) -> list[int]:
        return [self.text_tokens + v for v in self.visual_tokens_per_layer]

    def as_dict(self) -> dict[str, object]:
        """The flat, JSON-ready view: every field and derived count, parameters as their own keys
        (every registered method parameter: None where the method does not take it)."""
        from otprune.methods import all_params

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        for name in ("images", "visual_tokens_before", "visual_tokens_after", "seq_len_before", "seq_len_after",
                     "tokens_per_layer"):
            out[name] = getattr(self, name)
        out.update(dict.fromkeys(all_params()))
        out.update(self.params)
        return out

    # Read as a mapping (records, tests, lmms-eval glue read stats["visual_tokens_after"]).
    def __getitem__(self, key: str) -> object:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampleStats):
            return self.as_dict() == other.as_dict()
        if isinstance(other, Mapping):
            return self.as_dict() == dict(other)
        return NotImplemented

    __hash__ = None


def stats_for(config, image_index: Sequence[Sequence[int]], tokens_before: Sequence[int],
              schedules: Sequence[Sequence[int]], text_tokens: Sequence[int]) -> list[SampleStats]:
    """One `SampleStats` per sample: `image_index[b]` the batch-wide indices of sample b's images,
    `tokens_before[i]` / `schedules[i]` image i's tokens before pruning / at each layer."""
    batch = len(text_tokens)
    return [SampleStats.of(config, [tokens_before[i] for i in images], [schedules[i] for i in images], text, batch)
            for images, text in zip(image_index, text_tokens, strict=True)]


# Listeners of per-sample stats produced where no model hook reaches the caller (the vLLM plugin's
# processor runs in vLLM's front end): `otprune.eval` adds one that writes records. Core-level, so
# that any layer may emit without importing the layer that listens.
_LISTENERS: list = []


def add_listener(listener) -> None:
    """Call `listener(stats, **context)` on every `emit` of this process (once per listener)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def remove_listener(listener) -> None:
    """Stop calling `listener` (no error when it was not added)."""
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


def listening() -> bool:
    """True when some listener was added (emitters may skip building stats otherwise)."""
    return bool(_LISTENERS)


def emit(stats: Sequence[SampleStats], **context: object) -> None:
    """Hand one request's per-sample `stats` (and e.g. `config=`, `prune=`) to every listener."""
    for listener in list(_LISTENERS):
        listener(stats, **context)
