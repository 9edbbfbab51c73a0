"""Benchmarks behind `otprune bench`: the selection kernels (`selection`) and the LLM prefill of
transformers' models (`prefill`). May import every library layer, never the commands."""
