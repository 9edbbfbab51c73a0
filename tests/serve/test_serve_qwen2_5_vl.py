"""Exactness of the vLLM plugin on a tiny Qwen2.5-VL (issue 24, points 1 and 4): M-RoPE positions kept.

Engines (one after another, each shut down before the next starts):

- builtin: vLLM's own Qwen2_5_VLForConditionalGeneration (`VllmQwen2_5_VLForConditionalGeneration`);
- plugin:  ours, switches unset, ratios per request (none, 1.0, 0.5, 0.25; one and two images,
  one of them taller than wide);
- chunked: ours, SUBSET_RATIO=0.25 for the engine, prefix caching on, 8-token prefill chunks
  (each image's placeholders span several chunks), the requests mixed in one batch with
  per-request ratios, run twice (the second round reads the prefix cache);
- hf:      `otprune.hf` on transformers' Qwen2_5_VLForConditionalGeneration from the same
  checkpoint, in the same venv (kept tokens at their unpruned positions there too).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import (
    MAX_TOKENS,
    assert_matches,
    assert_rounds_same,
    assert_same,
    assert_same_as_builtin,  # noqa: E402
    family_runs,
    hf_reference,
    main_venv_env,
    main_venv_python,
    mrope_reference,
    ratio_cases,
    sized_images,
)

import otprune  # noqa: E402

RATIO = 0.25
ARCH_BUILTIN = "VllmQwen2_5_VLForConditionalGeneration"
MODEL = "Qwen2_5_VLForConditionalGeneration"
PAD = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{PAD}What is it?<|im_end|>\n<|im_start|>assistant\n"
PROMPT2 = f"<|im_start|>user\n{PAD}and {PAD}Compare them.<|im_end|>\n<|im_start|>assistant\n"
SIZES = {0: (160, 120), 1: (112, 196), 2: (196, 140), 3: (140, 196)}  # seed -> (width, height): 24, 28, 35, 35 tokens
CASES = ratio_cases(PROMPT, PROMPT2, RATIO, other="tall")


@pytest.fixture(scope="module")
def runs(tiny_qwen):
    return family_runs(tiny_qwen, ARCH_BUILTIN, CASES, SIZES, RATIO, chunk=8, **{"limit_mm_per_prompt": {"image": 2, "video": 0}})


def test_ratio_1_equals_vllm_builtin_tokens_and_logprobs(runs):
    builtin, plugin = runs["builtin"], runs["plugin"]
    for ours in ("one", "one@1.0"):
        assert_same_as_builtin(plugin[ours], builtin["one"], ours)  # prompt, tokens, first-step top-5 log-probs
    assert_same_as_builtin(plugin["two"], builtin["two"], "two")


def test_pruned_prompt_has_k_placeholders_per_image(runs):
    plugin = runs["plugin"]
    full = len(plugin["one"][0])
    assert len(plugin["one@0.5"][0]) == full - 24 + 12
    assert len(plugin["one@0.25"][0]) == full - 24 + 6
    assert len(plugin["two@0.25"][0]) == len(plugin["two"][0]) - (35 - 9) * 2


def test_kept_indices_equal_select_tokens_on_the_same_features(runs):
    records = runs["records"]
    assert records["one"] == [] and records["one@1.0"] == []
    for name, totals in (("one@0.5", [24]), ("one@0.25", [24]), ("tall@0.25", [28]), ("two@0.25", [35, 35])):
        assert [rec["total"] for rec in records[name]] == totals, name
        for rec in records[name]:
            ratio = CASES[name][2]
            assert rec["keep"] == round(ratio * rec["total"])
            assert torch.equal(rec["kept"], otprune.select_tokens(rec["features"], ratio)), name


def test_pruned_equals_an_explicit_reference_with_unpruned_positions(runs, tiny_qwen):
    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5", "one"),
                   lambda name: mrope_reference(tiny_qwen, MODEL, CASES[name][0], sized_images(SIZES, CASES[name][1]),
                                                CASES[name][2]), "explicit reference (Qwen2.5-VL)")  # fmt: skip


def test_the_positions_matter_a_compacted_numbering_gives_other_outputs(runs, tiny_qwen):
    """Negative control: the explicit reference with the pruned sequence numbered 0..L'-1 differs from
    the plugin, so the exactness test above does check the kept tokens' unpruned positions."""
    prompt, seeds, ratio = CASES["two@0.25"]
    _, tokens, first = mrope_reference(tiny_qwen, MODEL, prompt, sized_images(SIZES, seeds), ratio, compact=True)
    _, ours_tokens, ours_first, _ = runs["plugin"]["two@0.25"]
    diff = max(abs(lp - float(first[tok])) for tok, lp in ours_first.items())
    print(f"Qwen2.5-VL two@0.25, compacted positions: first-step log-prob max diff {diff:.3g}")
    assert diff > 1e-3 or tokens != ours_tokens


def test_pruned_equals_otprune_hf(runs, tiny_qwen):
    """otprune.hf in this venv (transformers 5.19): the same pruned prompt, greedy tokens and first-step
    log-probs. (Before transformers 5.24 the model's forward names its KV cache `past_key_values`; the
    adapter passes it under that name there, otherwise its decode steps ran without the cache.)"""
    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5"),
                   lambda name: hf_reference(tiny_qwen, MODEL, CASES[name][0],
                                             sized_images(SIZES, CASES[name][1]), CASES[name][2]),
                   "otprune.hf (Qwen2.5-VL)")  # fmt: skip


def test_a_batch_of_mixed_ratios_gives_each_requests_own_outputs(runs):
    for name in CASES:
        assert_same(runs["batch"][name], runs["plugin"][name], name)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    assert_rounds_same(runs["chunked"], runs["plugin"], RATIO, min_cached=32)


MAIN_VENV_SCRIPT = """
import json, sys
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
import otprune
from otprune import hf
sys.path.insert(0, sys.argv[1])
from conftest import image
processor = AutoProcessor.from_pretrained(sys.argv[2])
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
out = {}
for name, (prompt, images, ratio) in json.loads(sys.argv[3]).items():
    inputs = processor(text=prompt, images=[image(seed, tuple(size)) for seed, size in images], return_tensors="pt")
    with torch.no_grad(), hf.pruning(model, otprune.PruneConfig(method="otprune", layer=0, ratio=ratio)):
        tokens = model.generate(**inputs, max_new_tokens=int(sys.argv[4]), do_sample=False)
    out[name] = tokens[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps(out))
"""


def test_pruned_tokens_equal_otprune_hf_in_the_main_venv(runs, tiny_qwen):
    """otprune.hf's greedy tokens on the same checkpoint, run by the project's main venv (its
    transformers, the one otprune.hf is tested with); skipped where that venv is absent."""
    import json
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    python = main_venv_python()
    names = ["one@0.25", "tall@0.25", "two@0.25", "one@0.5"]
    cases = {n: (CASES[n][0], [(seed, SIZES[seed]) for seed in CASES[n][1]], CASES[n][2]) for n in names}
    out = subprocess.run([str(python), "-c", MAIN_VENV_SCRIPT, str(here), tiny_qwen, json.dumps(cases), str(MAX_TOKENS)],
                         capture_output=True, text=True, timeout=300, env=main_venv_env())  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    tokens = json.loads(out.stdout.strip().splitlines()[-1])
    for name in names:
        assert runs["plugin"][name][1] == tokens[name], name
