"""Exactness of the vLLM plugin on a tiny LLaVA-OneVision (issue 24, point 4): each image's anyres set
(base crop, grid crops, newline rows) is one token set, as in otprune.hf.

Engines (one after another): vLLM's own class (`VllmLlavaOnevisionForConditionalGeneration`);
ours without switches, ratios per request (one at a time with the kept indices recorded, then all
in one batch); ours with SUBSET_RATIO=0.25, prefix caching and 16-token prefill chunks, run twice.
The references: vLLM's class at ratio 1, `otprune.hf` on transformers' class from the same
checkpoint in this venv when pruned. Videos are refused by the serve venv's stand-in video
processor before the plugin sees them (`test_engine_start.py`), so the engines take images only.
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

RATIO = 0.25
ARCH_BUILTIN = "VllmLlavaOnevisionForConditionalGeneration"
PROMPT = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
PROMPT2 = "<|im_start|>user\n<image>\nand <image>\nCompare them.<|im_end|>\n<|im_start|>assistant\n"
SIZES = {0: (160, 120), 1: (90, 150), 2: (150, 90), 3: (120, 120)}  # seed -> (width, height): different grids
CASES = ratio_cases(PROMPT, PROMPT2, RATIO, other="tall")
LIMITS = {"limit_mm_per_prompt": {"image": 2, "video": 0}}




@pytest.fixture(scope="module")
def runs(tiny_onevision):
    return family_runs(tiny_onevision, ARCH_BUILTIN, CASES, SIZES, RATIO, chunk=16, **LIMITS)


def test_ratio_1_equals_vllm_builtin_tokens_and_logprobs(runs):
    assert_ratio_1_equals_builtin(runs)


def test_kept_indices_and_placeholder_counts(runs):
    two = assert_kept_indices(runs, CASES, RATIO)
    assert len({rec["total"] for rec in two}) == 2  # two grids, two token counts


def test_pruned_equals_otprune_hf(runs, tiny_onevision):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return hf_reference(tiny_onevision, "LlavaOnevisionForConditionalGeneration", prompt, sized_images(SIZES, seeds), ratio)

    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5", "one"), reference,
                   "otprune.hf (LLaVA-OneVision)")  # fmt: skip


def test_a_batch_of_mixed_ratios_gives_each_requests_own_outputs(runs):
    for name in CASES:
        assert_same(runs["batch"][name], runs["plugin"][name], name)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    assert_rounds_same(runs["chunked"], runs["plugin"], RATIO, min_cached=32)
