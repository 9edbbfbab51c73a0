"""LLaVA model classes: `LlavaLlamaForCausalLM` (registered as model_type "llava_llama")."""

from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from llava.model.llava_arch import VisualTokenLayout, greedy_select

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaLlamaModel", "VisualTokenLayout", "greedy_select"]
