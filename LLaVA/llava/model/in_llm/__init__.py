"""Pruning inside the LLM (`LAYER_INDEX > 0`, FastV, VTW, FitPrune), the model side: `decoder` runs
the pruned prefill and decoding and hands each stage a `decoder.StageContext`; `attention`
computes the attention rows the rules read. The rules themselves are pure and live in
`otprune.methods` (`fastv`, `vtw`, `fitprune`, and `in_llm.feature_keep` for a selection method
at layer L > 0)."""
