"""Visual-token pruning for transformers' own multimodal model classes (no modeling file copied).

    import otprune
    from otprune import hf
    adapter = hf.apply(model, otprune.PruneConfig(method="otprune", layer=0, ratio=0.25))
    out = model.generate(**inputs)          # prefill prunes every image; decoding follows
    adapter.last_stats                      # one dict per sample (token counts, timings)
    adapter.remove()                        # the model is unmodified again

    with hf.pruning(model, config):         # removed on exit
        ...

`apply(model)` without a config reads `BASELINE` / `LAYER_INDEX` / `SUBSET_RATIO` / ... at every
multimodal forward, like our llava package. The adapter is found from the model's class name.
`FAMILIES` (`otprune.hf.families`) holds one `Family` record per supported family: its
transformers class, its adapter and the writer of a tiny random-weight checkpoint (with a
processor) for tests (`otprune tiny-hf`), each imported on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from otprune.config import PruneConfig
from otprune.hf.base import HFAdapter
from otprune.hf.families import FAMILIES, Family, family, load_object


def _available_adapters() -> Iterator[tuple[str, type[HFAdapter]]]:
    """(family, adapter class) of every adapter whose module exists (one still being written is skipped)."""
    for record in FAMILIES.values():
        cls = record.load_adapter()
        if cls is not None:
            yield record.name, cls


def adapter_class(model: nn.Module) -> type[HFAdapter]:
    """The adapter class for `model`'s class (or a base class of it); ValueError when none."""
    names = [cls.__name__ for cls in type(model).__mro__]
    supported = []
    for _, cls in _available_adapters():
        for name in names:
            if name in cls.model_classes:
                return cls
        supported.extend(cls.model_classes)
    raise ValueError(
        f"model: {type(model).__name__} is not supported by otprune.hf; supported classes: {', '.join(supported)}"
    )


def apply(model: nn.Module, config: PruneConfig | None = None) -> HFAdapter:
    """Install pruning on `model` and return its adapter.

    Args:
        model: a loaded transformers model of a supported class (see `FAMILIES`).
        config: the pruning to run; None = read `PruneConfig.from_env()` at every multimodal forward.

    Applying to a model that already has an adapter removes that one first (the new config wins).
    """
    if config is not None and not isinstance(config, PruneConfig):
        raise ValueError(f"config: expected an otprune.PruneConfig or None (read the environment), got {type(config).__name__}")
    cls = adapter_class(model)
    current = getattr(model, "_otprune_adapter", None)
    if current is not None:
        current.remove()
    adapter = cls(model, config)
    if config is not None:
        adapter.check(config)
    return adapter.install()


@contextlib.contextmanager
def pruning(model: nn.Module, config: PruneConfig | None = None) -> Iterator[HFAdapter]:
    """`with pruning(model, config) as adapter:` prunes inside the block, removes on exit."""
    adapter = apply(model, config)
    try:
        yield adapter
    finally:
        adapter.remove()


def tiny_writer(name: str) -> Callable:
    """The tiny-checkpoint writer `write(path, seed=0) -> pathlib.Path` of family `name`."""
    return family(name).load_tiny_writer()


__all__ = ["FAMILIES", "Family", "HFAdapter", "adapter_class", "apply", "family", "load_object", "pruning", "tiny_writer"]
