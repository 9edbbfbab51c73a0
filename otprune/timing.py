"""Wall time of device work without host-device synchronisation until the time is read."""

from __future__ import annotations

import time

import torch


class Clock:
    """Elapsed wall time from construction to `stop()`, and optionally the peak memory.

    On CUDA two events are recorded on the device's current stream, so starting and stopping
    never waits for the device; `ms()` synchronises with the end event only when read. On other
    devices, `time.perf_counter()`.

    `memory=True` (the prefill's clock only: a nested clock would reset the outer one's peak)
    also measures the peak accelerator memory between start and stop: on CUDA the allocator's
    peak is reset at start and `max_memory_allocated` read at stop (host-side counters, no
    synchronisation), in `peak_memory_mb`. On a CPU there is no per-forward peak to read (the
    process's resident-set peak never resets), so `peak_memory_mb` stays None: unknown, never a
    made-up number.
    """

    def __init__(self, device: torch.device | str, *, memory: bool = False) -> None:
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self.stopped = False
        self.memory = memory and self.cuda
        self.peak_memory_mb: float | None = None
        if self.memory:
            torch.cuda.reset_peak_memory_stats(device)
        if self.cuda:
            self._device = device
            with torch.cuda.device(device):
                self._start = torch.cuda.Event(enable_timing=True)
                self._end = torch.cuda.Event(enable_timing=True)
                self._start.record()
        else:
            self._t0 = time.perf_counter()
            self._t1: float | None = None

    def stop(self) -> Clock:
        if self.cuda:
            with torch.cuda.device(self._device):
                self._end.record()
            if self.memory:
                self.peak_memory_mb = torch.cuda.max_memory_allocated(self._device) / 2**20
        else:
            self._t1 = time.perf_counter()
        self.stopped = True
        return self

    def ms(self) -> float:
        """Milliseconds between construction and `stop()`."""
        if not self.stopped:
            raise ValueError("Clock.ms(): the clock was never stopped; call stop() first")
        if self.cuda:
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end))
        return (self._t1 - self._t0) * 1000.0
