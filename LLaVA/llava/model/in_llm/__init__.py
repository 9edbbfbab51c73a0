"""Pruning inside the LLM (`LAYER_INDEX > 0`, FastV, VTW, FitPrune): see `decoder` for the mechanics,
one file per rule (`feature`, `fastv`, `vtw`, `fitprune`), `attention` for the side-computed scores."""
