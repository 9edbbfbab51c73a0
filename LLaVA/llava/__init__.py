"""`llava`: LLaVA-1.5 / LLaVA-1.6 (Llama based) on current transformers, with visual-token pruning.

A package written for the OTPrune project from the public description of the LLaVA architecture.
It keeps the module layout and the names that lmms-eval and users' scripts import from the
original package (`llava.constants`, `llava.conversation`, `llava.mm_utils`,
`llava.model.builder.load_pretrained_model`, `llava.model.LlavaLlamaForCausalLM`) and loads
the original checkpoints. Importing `llava` itself is cheap: the model classes (and
transformers) load on first use.
"""

from __future__ import annotations

__all__ = ["LlavaLlamaForCausalLM"]


def __getattr__(name: str):
    if name == "LlavaLlamaForCausalLM":
        from llava.model import LlavaLlamaForCausalLM

        return LlavaLlamaForCausalLM
    raise AttributeError(f"module 'llava' has no attribute {name!r}")
