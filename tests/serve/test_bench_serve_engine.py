"""`otprune bench serve --family` runs one tiny step in vLLM for every family the plugin prunes
with a real-geometry checkpoint (Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3; the Qwen ones also with
`--media video`, an 8-frame video of 448 px frames): the token counts the engine reports
against the geometry, the FLOPs ratio against the formula written out, the selection timed. No
timing assertions."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

from otprune.bench import serve as bench_serve  # noqa: E402

RATIO = 0.098
# visual tokens of a 448 x 448 image: Qwen2.5-VL 448 / (14 px x 2 merge) = 16 per side, Qwen3-VL 448 / (16 x 2) = 14;
# InternVL's 1344 x 896 image: 3 x 2 tiles of 448 px + a thumbnail, each 448 / (14 px x 2 pixel shuffle) = 16 per side;
# Gemma 3's 896 px image: 64 x 64 patches of 14 px pooled 4 x 4 -> 16 per side
VISUAL = {"qwen2_5_vl": 16 * 16, "qwen3_vl": 14 * 14, "internvl": (3 * 2 + 1) * 16 * 16, "gemma3": 16 * 16}


def formula(n: int, d: int, m: int, layers: int) -> int:
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


@pytest.mark.parametrize("family", sorted(VISUAL))
def test_one_tiny_step(family):
    entry = bench_serve.serve_family(family)
    size = bench_serve.serve_size(entry, 128, intermediate=256, heads=4, kv_heads=2)  # head size 32 (vLLM CPU)
    result = bench_serve.run(family=family, size=size, layers=1, ratio=RATIO, requests=1, max_tokens=1, rounds=1,
                             ttft_repeats=1, progress=lambda message: None,
                             engine_options={"enforce_eager": True, "max_model_len": 2048})  # fmt: skip
    assert result.visual_tokens == entry.visual_tokens == VISUAL[family]
    assert result.kept_tokens == round(RATIO * VISUAL[family])
    assert result.prompt_tokens - result.pruned_prompt_tokens == VISUAL[family] - result.kept_tokens
    expected = formula(result.pruned_prompt_tokens, 128, 256, 1) / formula(result.prompt_tokens, 128, 256, 1)
    assert result.flops_ratio == pytest.approx(expected, rel=1e-12)
    assert result.ttft_parts["pruned"]["select"][0] > 0.0  # the timer wraps the selection these classes call
    table = bench_serve.format_table(result)
    assert f"-> {VISUAL[family]} visual tokens per image, kept {result.kept_tokens}" in table


# visual tokens of the 8-frame video of 448 px frames: temporal patch 2 -> 4 steps of one frame's tokens
VIDEO = {"qwen2_5_vl": 4 * 16 * 16, "qwen3_vl": 4 * 14 * 14}


@pytest.mark.parametrize("family", sorted(VIDEO))
def test_one_tiny_video_step(family):
    entry = bench_serve.serve_family(family)
    size = bench_serve.serve_size(entry, 128, intermediate=256, heads=4, kv_heads=2)
    result = bench_serve.run(family=family, size=size, layers=1, ratio=RATIO, requests=1, max_tokens=1, rounds=1,
                             ttft_repeats=1, progress=lambda message: None, media="video",
                             engine_options={"enforce_eager": True, "max_model_len": 2048})  # fmt: skip
    assert result.visual_tokens == entry.video_tokens == VIDEO[family]
    assert result.kept_tokens == round(RATIO * VIDEO[family])  # one token set per video (Qwen3-VL's timestamps kept)
    assert result.ttft_parts["pruned"]["select"][0] > 0.0
    table = bench_serve.format_table(result)
    assert f"-> {VIDEO[family]} visual tokens per 8-frame video of 448 x 448 frames (one token set), kept" in table
