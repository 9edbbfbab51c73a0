"""Exactness of the vLLM plugin on a tiny Qwen3-VL (issue 24, points 1 and 4): M-RoPE positions kept,
DeepStack features kept with the same indices.

The engines of `family_runs` (vLLM's own class, ours with per-request ratios, ours with
SUBSET_RATIO=0.25, prefix caching and 8-token chunks). The pruned reference is `mrope_reference`:
transformers' Qwen3VLForConditionalGeneration's public pieces (tower with its DeepStack features,
`get_rope_index`, the language model with `visual_pos_masks` / `deepstack_visual_embeds`), no KV
cache; and `otprune.hf`'s Qwen3-VL adapter on the same checkpoint in this venv.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import (
    assert_matches,
    assert_rounds_same,
    assert_same,
    assert_same_as_builtin,  # noqa: E402
    family_runs,
    hf_reference,
    mrope_reference,
    ratio_cases,
    sized_images,
)

import otprune  # noqa: E402

RATIO = 0.25
ARCH_BUILTIN = "VllmQwen3VLForConditionalGeneration"
MODEL = "Qwen3VLForConditionalGeneration"
PAD = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{PAD}What is it?<|im_end|>\n<|im_start|>assistant\n"
PROMPT2 = f"<|im_start|>user\n{PAD}and {PAD}Compare them.<|im_end|>\n<|im_start|>assistant\n"
SIZES = {0: (160, 128), 1: (128, 224), 2: (224, 160), 3: (160, 224)}  # 32 px per token: 20, 28, 35, 35 tokens
CASES = ratio_cases(PROMPT, PROMPT2, RATIO, other="tall")


@pytest.fixture(scope="module")
def runs(tiny_qwen3_vl):
    return family_runs(tiny_qwen3_vl, ARCH_BUILTIN, CASES, SIZES, RATIO, chunk=8,
                       limit_mm_per_prompt={"image": 2, "video": 0})  # fmt: skip


def test_ratio_1_equals_vllm_builtin_tokens_and_logprobs(runs):
    builtin, plugin = runs["builtin"], runs["plugin"]
    for ours in ("one", "one@1.0"):
        assert_same_as_builtin(plugin[ours], builtin["one"], ours)
    assert_same_as_builtin(plugin["two"], builtin["two"], "two")


def test_kept_indices_are_selected_on_the_main_columns(runs):
    records = runs["records"]
    assert records["one"] == [] and records["one@1.0"] == []
    for name, totals in (("one@0.5", [20]), ("one@0.25", [20]), ("tall@0.25", [28]), ("two@0.25", [35, 35])):
        assert [rec["total"] for rec in records[name]] == totals, name
        for rec in records[name]:
            assert rec["features"].shape[1] == 64  # the merger output, not the DeepStack columns
            assert torch.equal(rec["kept"], otprune.select_tokens(rec["features"], CASES[name][2])), name
    assert len(runs["plugin"]["two@0.25"][0]) == len(runs["plugin"]["two"][0]) - 2 * (35 - 9)


def test_pruned_equals_an_explicit_reference_with_unpruned_positions_and_deepstack(runs, tiny_qwen3_vl):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return mrope_reference(tiny_qwen3_vl, MODEL, prompt, sized_images(SIZES, seeds), ratio)

    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5", "one"), reference,
                   "explicit reference (Qwen3-VL)")  # fmt: skip


def test_pruned_equals_otprune_hf(runs, tiny_qwen3_vl):
    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5"),
                   lambda name: hf_reference(tiny_qwen3_vl, MODEL, CASES[name][0],
                                             sized_images(SIZES, CASES[name][1]), CASES[name][2]),
                   "otprune.hf (Qwen3-VL)")  # fmt: skip


def test_a_batch_of_mixed_ratios_gives_each_requests_own_outputs(runs):
    for name in CASES:
        assert_same(runs["batch"][name], runs["plugin"][name], name)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    assert_rounds_same(runs["chunked"], runs["plugin"], RATIO, min_cached=32)
