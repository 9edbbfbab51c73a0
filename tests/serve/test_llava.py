"""Exactness of the vLLM plugin on a tiny LLaVA-1.5 (issue #14, point 3).

Engines run one after another (each is shut down before the next starts); `runs` keeps their
outputs for the tests:

- builtin: vLLM's own LlavaForConditionalGeneration (`VllmLlavaForConditionalGeneration`);
- plugin:  ours, switches unset, ratios per request (none, 1.0, 0.5, 0.25; one and two images);
- chunked: ours, SUBSET_RATIO=0.25 for the engine, prefix caching on and 24-token prefill
  chunks (each image's placeholders span several chunks), the same requests mixed in one batch
  with per-request ratios, run twice (the second round reads the prefix cache);
- hf:      `otprune.hf` on transformers' LlavaForConditionalGeneration from the same checkpoint.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import (
    MAX_TOKENS,
    PROMPT,
    PROMPT2,
    assert_matches,
    assert_same,
    assert_same_as_builtin,
    engine,
    generate,
    hf_reference,
    image,
    ratio_cases,
    request,
)

import otprune  # noqa: E402

RATIO = 0.25
T = 64  # tokens per image of the tiny checkpoint (112 px, 14 px patches, CLS dropped)
ARCH_BUILTIN = "VllmLlavaForConditionalGeneration"

BAD_RATIOS = (0.0, 1.5, "half", 10**400, "1e400", "abc", -0.5, 2, float("nan"), "")
CASES = ratio_cases(PROMPT, PROMPT2, RATIO)


def _requests(names):
    return [request(CASES[n][0], [image(s) for s in CASES[n][1]], CASES[n][2]) for n in names]


@pytest.fixture(scope="module")
def runs(tiny_llava):
    results: dict = {}
    with engine(tiny_llava, arch=ARCH_BUILTIN, enable_prefix_caching=False) as llm:
        names = ["one", "two"]
        results["builtin"] = dict(zip(names, generate(llm, _requests(names)), strict=True))
    with engine(tiny_llava, enable_prefix_caching=False) as llm:
        assert type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model).__name__.startswith("OTPrune")
        llm.apply_model(lambda model: setattr(model, "otprune_record", []))
        names = list(CASES)
        plugin = {}
        records = {}
        for name in names:  # one at a time, so each request's records are its own
            plugin[name] = generate(llm, _requests([name]))[0]
            records[name] = llm.apply_model(lambda model: list(model.otprune_record))[0]
            llm.apply_model(lambda model: model.otprune_record.clear())
        results["plugin"], results["records"] = plugin, records
        errors = []
        for bad in BAD_RATIOS:  # refused at processing, in the front end; the engine keeps serving
            try:
                generate(llm, [request(PROMPT, [image(0)], bad)])
            except Exception as err:  # noqa: BLE001 - vLLM may wrap the ValueError
                errors.append(str(err))
        results["bad_ratio_errors"] = errors
        results["after_bad"] = generate(llm, _requests(["one@0.25"]))[0]
        results["text_after_bad"] = generate(llm, [{"prompt": "USER: Hello ASSISTANT:"}])[0]
    chunked_names = ["one", "one@1.0", "one@0.5", "two", "other@0.25"]
    with engine(
        tiny_llava, env={"SUBSET_RATIO": str(RATIO)}, enable_prefix_caching=True, enable_chunked_prefill=True,
        max_num_batched_tokens=24, max_num_seqs=4, block_size=32,
    ) as llm:  # fmt: skip
        results["chunked"] = [dict(zip(chunked_names, generate(llm, _requests(chunked_names)), strict=True))
                              for _ in range(2)]  # fmt: skip
    results["chunked_names"] = chunked_names
    return results


def test_the_entry_point_registers_the_plugin_classes():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does at start: loads our entry point
    archs = set(ModelRegistry.get_supported_archs())
    for name in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", ARCH_BUILTIN,
                 "OTPruneLlavaForConditionalGeneration"):  # fmt: skip
        assert name in archs


def test_ratio_1_equals_vllm_builtin_tokens_and_logprobs(runs):
    builtin, plugin = runs["builtin"], runs["plugin"]
    for ours in ("one", "one@1.0"):
        assert_same_as_builtin(plugin[ours], builtin["one"], ours)  # same prompt: T placeholders
    assert_same_as_builtin(plugin["two"], builtin["two"], "two")


def test_pruned_prompt_has_k_placeholders_per_image(runs):
    plugin = runs["plugin"]
    full = len(plugin["one"][0])
    assert len(plugin["one@0.5"][0]) == full - T + 32
    assert len(plugin["one@0.25"][0]) == full - T + 16
    assert len(plugin["two@0.25"][0]) == len(plugin["two"][0]) - 2 * (T - 16)


def test_kept_indices_equal_select_tokens_on_the_same_features(runs):
    records = runs["records"]
    assert records["one"] == [] and records["one@1.0"] == []  # nothing selected at ratio 1
    for name, ratio, images in (("one@0.5", 0.5, 1), ("one@0.25", RATIO, 1), ("two@0.25", RATIO, 2)):
        assert len(records[name]) == images
        for rec in records[name]:
            assert rec["total"] == T and rec["keep"] == round(ratio * T)
            expected = otprune.select_tokens(rec["features"], ratio)
            assert torch.equal(rec["kept"], expected), name


def test_pruned_equals_otprune_hf(runs, tiny_llava):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return hf_reference(tiny_llava, "LlavaForConditionalGeneration", prompt, [image(s) for s in seeds], ratio)

    assert_matches(runs["plugin"], ("one@0.25", "other@0.25", "two@0.25", "one@0.5", "one"), reference, "otprune.hf")


def test_features_match_transformers_tower(runs, tiny_llava):
    """The rows the plugin selects on are transformers' projected image features (up to fp32 rounding)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    pixels = processor(text=PROMPT, images=[image(0)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default", return_dict=True).pooler_output[0]  # fmt: skip
    ours = runs["records"]["one@0.25"][0]["features"]
    assert ours.shape == feats.shape
    assert torch.allclose(ours, feats, atol=1e-4, rtol=1e-4)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    plugin = runs["plugin"]
    engine_default = {"one": "one@0.25", "one@1.0": "one@1.0", "one@0.5": "one@0.5", "two": "two@0.25",
                      "other@0.25": "other@0.25"}  # fmt: skip
    first_round, second_round = runs["chunked"]
    for name in runs["chunked_names"]:
        reference = plugin[engine_default[name]]
        for round_ in (first_round, second_round):
            ours = round_[name]
            assert ours[0] == reference[0], name
            assert ours[1] == reference[1], name
            for tok, lp in ours[2].items():
                assert math.isclose(lp, reference[2][tok], abs_tol=1e-4), name
    # the second round read the prefix cache (pruned image placeholders included)
    assert sum(out[3] for out in second_round.values()) > 0
    assert second_round["one"][3] >= 16  # beyond the text prefix: a block with the image's kept tokens


def test_invalid_request_ratio_is_refused_and_the_engine_keeps_serving(runs):
    errors = runs["bad_ratio_errors"]
    assert len(errors) == len(BAD_RATIOS) and all("otprune_ratio" in e for e in errors), errors
    assert_same(runs["after_bad"], runs["plugin"]["one@0.25"], "after_bad", tol=1e-5)  # image requests still served, same outputs
    assert len(runs["text_after_bad"][1]) == MAX_TOKENS  # and text ones
