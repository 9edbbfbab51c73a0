"""`otprune.timing.Clock`: wall time, and the prefill's peak memory where the device has one."""

import torch

from otprune.stats import SampleStats
from otprune.timing import Clock


def test_cpu_clock_times_and_leaves_peak_memory_unknown():
    clock = Clock("cpu", memory=True)
    torch.ones(1000).sum()
    assert clock.stop().ms() >= 0.0
    assert clock.peak_memory_mb is None  # no per-forward peak on a CPU: never a made-up number


def test_sample_stats_carry_the_peak():
    stats = SampleStats(method=None, layer=None, ratio=None, order=None, params={}, image_tokens_before=[4],
                        image_tokens_after=[4], text_tokens=3, batch_size=1, visual_tokens_per_layer=[4, 4],
                        peak_memory_mb=12.5)
    assert stats["peak_memory_mb"] == 12.5 and stats.as_dict()["seq_len_before"] == 7
