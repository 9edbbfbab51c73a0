"""OTPrune: distribution-aligned visual token pruning via optimal transport.

    import otprune
    keep = otprune.select_tokens(features, 0.098)            # features: (N, D) -> (K,) indices
    keep = otprune.select_tokens(batch, 0.098, "divprune", lengths=lengths)  # (B, N, D) -> (B, K_max)
"""

from otprune.config import PruneConfig
from otprune.methods import METHODS, TokenSelector, get_method
from otprune.selection import keep_counts, select_tokens

__version__ = "0.1.0"

__all__ = ["METHODS", "PruneConfig", "TokenSelector", "get_method", "keep_counts", "select_tokens", "__version__"]
