"""Numerical guards shared by the selection methods: exact power-of-two rescaling and a
single-threaded scope for loops of small ops.

Rescaling. OTPrune's column normalisation and the cosine kernels of DivPrune / DPP are
invariant to the scale of the features in exact arithmetic, but squaring fp32 values of 1e20
overflows and squaring 1e-30 underflows. Multiplying by a power of two is exact (the mantissa is
kept), so scaling every column (or token) by 2^-e, with e the exponent of its largest magnitude,
brings it to [0.5, 1) without changing a single rounding of what follows: features `x` and
`2^k * x` give bit-identical kernels, and `c * x` for any c differs only by the rounding of the
input itself. (OTPrune skips the rescaled copy when no column is anywhere near the limits:
`otprune.methods.otprune.column_weights`.)

Threads. Greedy loops run hundreds of tiny ops (a few thousand elements), and a pass over the
features chunk by chunk runs dozens of small memory-bound ones. With PyTorch's intra-op threads,
every op that fans out waits at a barrier for all threads; on a busy CPU a descheduled thread
turns a 10 us op into milliseconds. Such loops therefore run with one intra-op thread on the CPU
(`one_thread`); the large products keep every thread.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import Tensor


def pow2_scale(amax: Tensor) -> Tensor:
    """Exact powers of two 2^-e with `amax * 2^-e` in [0.5, 1) (1 where amax is 0), same shape.

    The exponent is clamped to the dtype's normal range, so the scale is always finite (the
    extreme cases end at magnitude ~1 instead of [0.5, 1)).
    """
    high = math.floor(math.log2(torch.finfo(amax.dtype).max))  # 127 for fp32, 1023 for fp64
    _, exponent = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), (-exponent).clamp(-high, high - 1).to(amax.dtype))


def max_abs(features: Tensor, dim: int) -> Tensor:
    """The largest |value| along `dim` (kept as a size-1 dim), without an |x| copy.

    Two reductions (`amax`, `amin`): on CPU each is ~20x faster than one fused `aminmax`.
    """
    high = features.amax(dim=dim, keepdim=True)
    low = features.amin(dim=dim, keepdim=True)
    return torch.maximum(high, low.neg())


_lock = threading.Lock()
_depth = 0
_saved = 1


@contextlib.contextmanager
def _single_thread():
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            if _saved != 1:
                torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved != 1:
                torch.set_num_threads(_saved)


def one_thread(device: torch.device):
    """A scope with one intra-op thread for the loops of tiny ops, on the CPU only.

    Process-wide (PyTorch's thread count is global): nested or concurrent scopes share one
    saved value, restored when the last scope ends. A no-op on other devices and while
    `torch.compile` traces (it never enters the graph).
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _single_thread()
