"""Exactness of the vLLM plugin on a tiny InternVL (HF format, issue 24, point 4), served by vLLM's
`interns1` class: each image's tiles (thumbnail included) are one token set, as in otprune.hf.

Engines (one after another): vLLM's own class (`VllmInternVLForConditionalGeneration`); ours
without switches, ratios per request (one at a time with the kept indices recorded, then all in
one batch); ours with SUBSET_RATIO=0.25, prefix caching and 16-token prefill chunks (every image,
16 tokens per tile, spans several chunks), run twice. The references: vLLM's class at ratio 1,
`otprune.hf` on transformers' `InternVLForConditionalGeneration` from the same checkpoint in this
venv when pruned. Videos: the serve venv's stand-in video processor refuses them, and a pruning
request with one is refused by the plugin (`test_engine_start.py`-style check below).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

from conftest import (  # noqa: E402
    assert_kept_indices,
    assert_matches,
    assert_ratio_1_equals_builtin,
    assert_rounds_same,
    assert_same,
    family_runs,
    hf_reference,
    ratio_cases,
    sized_images,
)

from otprune.hf.internvl_tiny import TOKENS_PER_TILE  # noqa: E402

RATIO = 0.25
ARCH_BUILTIN = "VllmInternVLForConditionalGeneration"
PROMPT = "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
PROMPT2 = "<|im_start|>user\n<IMG_CONTEXT>\nand <IMG_CONTEXT>\nCompare them.<|im_end|>\n<|im_start|>assistant\n"
# seed -> (width, height): 64 px tiles, up to 4 crops plus a thumbnail: different tile counts
SIZES = {0: (160, 120), 1: (90, 150), 2: (150, 90), 3: (64, 64)}
CASES = ratio_cases(PROMPT, PROMPT2, RATIO, other="tall")
LIMITS = {"limit_mm_per_prompt": {"image": 2, "video": 0}}


@pytest.fixture(scope="module")
def runs(tiny_internvl):
    return family_runs(tiny_internvl, ARCH_BUILTIN, CASES, SIZES, RATIO, chunk=16, **LIMITS)


def test_ratio_1_equals_vllm_builtin_tokens_and_logprobs(runs):
    assert_ratio_1_equals_builtin(runs)


def test_kept_indices_per_image_over_all_its_tiles(runs):
    two = assert_kept_indices(runs, CASES, RATIO)
    assert [rec["total"] // TOKENS_PER_TILE for rec in two] == [3, 1]  # 2 crops + thumbnail; 1 tile
    assert all(rec["total"] % TOKENS_PER_TILE == 0 for rec in two)
    (one,) = runs["records"][f"one@{RATIO}"]  # one image: one selection over all its tiles
    assert one["total"] > TOKENS_PER_TILE


def test_pruned_equals_otprune_hf(runs, tiny_internvl):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return hf_reference(tiny_internvl, "InternVLForConditionalGeneration", prompt, sized_images(SIZES, seeds), ratio)

    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5", "one"), reference,
                   "otprune.hf (InternVL)")  # fmt: skip


def test_a_batch_of_mixed_ratios_gives_each_requests_own_outputs(runs):
    for name in CASES:
        assert_same(runs["batch"][name], runs["plugin"][name], name)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    assert_rounds_same(runs["chunked"], runs["plugin"], RATIO, min_cached=32)
