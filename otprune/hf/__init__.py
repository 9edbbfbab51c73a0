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
multimodal forward, like our llava package. The adapter is found from the model's class name
(`ADAPTERS`: family -> "module:Class", imported on first use). `TINY_WRITERS` write tiny
random-weight checkpoints (with a processor) of each family, for tests (`otprune tiny-hf`).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

from torch import nn

from otprune.config import PruneConfig
from otprune.hf.base import HFAdapter

ADAPTERS: dict[str, str] = {
    "llava": "otprune.hf.llava:LlavaAdapter",
    "llava_next": "otprune.hf.llava:LlavaNextAdapter",
    "onevision": "otprune.hf.llava:LlavaOnevisionAdapter",
    "qwen2_5_vl": "otprune.hf.qwen2_5_vl:Qwen2_5_VLAdapter",
}

# family -> the transformers class its adapter prunes (and `otprune tiny-hf` / `otprune bench prefill` build).
MODEL_CLASSES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
FAMILIES = tuple(MODEL_CLASSES)

TINY_WRITERS: dict[str, str] = {
    "llava": "otprune.hf.tiny:write_tiny_llava",
    "llava_next": "otprune.hf.tiny:write_tiny_llava_next",
    "onevision": "otprune.hf.tiny:write_tiny_onevision",
    "qwen2_5_vl": "otprune.hf.qwen2_5_vl_tiny:write_tiny_qwen2_5_vl",
}


def load_object(target: str) -> object:
    """Import "package.module:name" and return the attribute."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _available_adapters() -> Iterator[tuple[str, type[HFAdapter]]]:
    """(family, adapter class) of every adapter whose module exists (one still being written is skipped)."""
    for family, target in ADAPTERS.items():
        module = target.partition(":")[0]
        try:
            cls = load_object(target)
        except ModuleNotFoundError as err:
            if err.name == module:
                continue
            raise
        yield family, cls


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
        model: a loaded transformers model of a supported class (see `ADAPTERS`).
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


def tiny_writer(family: str) -> Callable:
    """The tiny-checkpoint writer `write(path, seed=0) -> pathlib.Path` of `family` (see `TINY_WRITERS`)."""
    if family not in TINY_WRITERS:
        raise ValueError(f"family={family!r}: must be one of {', '.join(TINY_WRITERS)}")
    target = TINY_WRITERS[family]
    module = target.partition(":")[0]
    try:
        return load_object(target)
    except ModuleNotFoundError as err:
        if err.name == module:
            raise ValueError(f"family={family!r}: its writer {target} is not available yet (module {module} not found)") from None
        raise


__all__ = ["ADAPTERS", "FAMILIES", "MODEL_CLASSES", "TINY_WRITERS", "HFAdapter", "adapter_class", "apply", "load_object", "pruning", "tiny_writer"]
