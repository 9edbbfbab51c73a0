"""The model families `otprune.hf` prunes: one `Family` record each, in `FAMILIES`.

A record names, as text, the transformers class the family's adapter prunes, the adapter
("module:Class"), the writer of a tiny random-weight checkpoint ("module:function", for tests
and `otprune tiny-hf`), the `model_type` of the family's config.json and lmms-eval's own model
name that loads it (pruned by the switches through `otprune.eval.lmms_plugin`; `otprune run`
routes a checkpoint folder by its `model_type`); modules are imported on first use. `apply`, `otprune tiny-hf`,
`otprune bench prefill` and the tests read this one table. A new family is one more record.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its name (`--family`), transformers class, adapter and tiny writer."""

    name: str
    model_class: str  # transformers class name, e.g. "LlavaForConditionalGeneration"
    adapter: str  # "module:Class" of its `otprune.hf.base.HFAdapter` subclass
    tiny_writer: str  # "module:function", `write(path, seed=0) -> pathlib.Path`
    model_type: str  # config.json's model_type, e.g. "llava"
    lmms_model: str  # lmms-eval 0.7's own model name for it, e.g. "llava_hf"

    def load_adapter(self) -> type | None:
        """The adapter class, or None while its module does not exist (an adapter being written)."""
        return _load_if_present(self.adapter)

    def load_model_class(self) -> type:
        """The transformers model class (imports transformers)."""
        import transformers

        return getattr(transformers, self.model_class)

    def load_tiny_writer(self) -> Callable:
        """The tiny-checkpoint writer; ValueError naming the family when its module does not exist."""
        writer = _load_if_present(self.tiny_writer)
        if writer is None:
            module = self.tiny_writer.partition(":")[0]
            raise ValueError(f"family={self.name!r}: its writer {self.tiny_writer} is not available yet (module {module} not found)")
        return writer


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llava", "LlavaForConditionalGeneration", "otprune.hf.llava:LlavaAdapter", "otprune.hf.tiny:write_tiny_llava",
               "llava", "llava_hf"),
        Family("llava_next", "LlavaNextForConditionalGeneration", "otprune.hf.llava:LlavaNextAdapter",
               "otprune.hf.tiny:write_tiny_llava_next", "llava_next", "llava_hf"),
        Family("onevision", "LlavaOnevisionForConditionalGeneration", "otprune.hf.llava:LlavaOnevisionAdapter",
               "otprune.hf.tiny:write_tiny_onevision", "llava_onevision", "llava_hf"),
        Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "otprune.hf.qwen2_5_vl:Qwen2_5_VLAdapter",
               "otprune.hf.qwen2_5_vl_tiny:write_tiny_qwen2_5_vl", "qwen2_5_vl", "qwen2_5_vl"),
        Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "otprune.hf.qwen3_vl:Qwen3VLAdapter",
               "otprune.hf.qwen3_vl_tiny:write_tiny_qwen3_vl", "qwen3_vl", "qwen3_vl"),
        Family("qwen3_5", "Qwen3_5ForConditionalGeneration", "otprune.hf.qwen3_vl:Qwen3_5Adapter",
               "otprune.hf.qwen3_vl_tiny:write_tiny_qwen3_5", "qwen3_5", "qwen3_5"),
        Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "otprune.hf.qwen3_vl:Qwen3VLMoeAdapter",
               "otprune.hf.qwen3_vl_tiny:write_tiny_qwen3_vl_moe", "qwen3_vl_moe", "qwen3_vl"),
        Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "otprune.hf.qwen3_vl:Qwen3_5MoeAdapter",
               "otprune.hf.qwen3_vl_tiny:write_tiny_qwen3_5_moe", "qwen3_5_moe", "qwen3_5"),
        Family("gemma3", "Gemma3ForConditionalGeneration", "otprune.hf.gemma3:Gemma3Adapter",
               "otprune.hf.gemma3_tiny:write_tiny_gemma3", "gemma3", "gemma3"),
        Family("internvl", "InternVLForConditionalGeneration", "otprune.hf.internvl:InternVLAdapter",
               "otprune.hf.internvl_tiny:write_tiny_internvl", "internvl", "internvl_hf"),
    )
}  # fmt: skip


def family(name: str) -> Family:
    """The record of family `name`; ValueError listing the families when unknown."""
    found = FAMILIES.get(name)
    if found is None:
        raise ValueError(f"family={name!r}: must be one of {', '.join(FAMILIES)}")
    return found


def load_object(target: str) -> object:
    """Import "package.module:name" and return the attribute."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _load_if_present(target: str) -> object | None:
    """`load_object(target)`, or None when the target's own module does not exist (a missing
    dependency of that module still raises)."""
    module = target.partition(":")[0]
    try:
        return load_object(target)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise
