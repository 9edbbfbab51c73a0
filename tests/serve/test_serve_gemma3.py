"""The vLLM plugin on a tiny Gemma 3 (issue 24, point 4), and what vLLM 0.32's CPU engine does with
Gemma 3's bidirectional image block.

Gemma 3 lets the tokens of one image attend to each other both ways (transformers:
`token_type_ids` == 1 on the image's placeholders). vLLM 0.32 runs that block only on attention
backends with multimodal-prefix support; its CPU backend (`CPU_ATTN`) has none
(`supports_mm_prefix()` False) and vLLM starts anyway: its own Gemma 3 class then attends
causally inside the image. `test_vllm_builtin_on_cpu_attends_causally_inside_the_image` is the
minimal reproduction: the built-in class's prompt log-probs equal transformers' with
`token_type_ids` zeroed and differ from transformers' own (bidirectional) ones on the image rows.

The plugin keeps vLLM's attention as it is: at ratio 1 it equals vLLM's class (log-probs within 1e-5); pruned,
it equals `otprune.hf` run with the same causal mask inside the image (`token_type_ids` zeroed),
and it logs a warning naming the backend at start. Engines: vLLM's class, ours without switches
(ratios per request, one at a time with the kept indices recorded, then in one batch), ours with
SUBSET_RATIO=0.25, prefix caching and chunked prefill, run twice; vLLM's class once more for the
prompt log-probs; ours once more for a pruned prompt's log-probs and the pan-and-scan refusal.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import (  # noqa: E402
    assert_kept_indices,
    assert_matches,
    assert_ratio_1_equals_builtin,
    assert_rounds_same,
    assert_same,
    engine,
    family_runs,
    hf_reference,
    image,
    ratio_cases,
    request,
    sized_images,
)

import otprune  # noqa: E402

RATIO = 0.25
ARCH_BUILTIN = "VllmGemma3ForConditionalGeneration"
PROMPT = "<bos><start_of_turn>user\n<start_of_image>What is it?<end_of_turn>\n<start_of_turn>model\n"
PROMPT2 = "<bos><start_of_turn>user\n<start_of_image>and <start_of_image>Compare them.<end_of_turn>\n<start_of_turn>model\n"
SIZES = {0: (160, 120), 1: (90, 150), 2: (150, 90), 3: (120, 120)}  # every image: 16 tokens (64 px, no pan-and-scan)
CASES = ratio_cases(PROMPT, PROMPT2, RATIO, other="tall")


def causal(inputs):
    """The processor's output with `token_type_ids` zeroed: transformers' Gemma 3 with a causal mask inside images."""
    inputs["token_type_ids"] = torch.zeros_like(inputs["token_type_ids"])
    return inputs


@pytest.fixture(scope="module")
def runs(tiny_gemma3):
    return family_runs(tiny_gemma3, ARCH_BUILTIN, CASES, SIZES, RATIO, chunk=16)


def prompt_logprobs(path: str, arch: str | None, prompt: str, images: list) -> tuple[list[int], list[float]]:
    from vllm import SamplingParams

    with engine(path, arch=arch, enable_prefix_caching=False) as llm:
        (out,) = llm.generate([request(prompt, images)], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                              use_tqdm=False)  # fmt: skip
    ids = list(out.prompt_token_ids)
    return ids, [entry[ids[i]].logprob for i, entry in enumerate(out.prompt_logprobs) if entry is not None]


def transformers_prompt_logprobs(path: str, prompt: str, images: list, edit=None) -> tuple[list[int], list[float], list[int]]:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    types = inputs["token_type_ids"][0].tolist()
    if edit is not None:
        inputs = edit(inputs)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    ids = inputs["input_ids"][0].tolist()
    return ids, [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))], types


def test_vllm_builtin_on_cpu_attends_causally_inside_the_image(tiny_gemma3):
    images = [image(0, SIZES[0])]
    ids, ours = prompt_logprobs(tiny_gemma3, ARCH_BUILTIN, PROMPT, images)
    ids_bi, bidirectional, types = transformers_prompt_logprobs(tiny_gemma3, PROMPT, images)
    ids_causal, masked, _ = transformers_prompt_logprobs(tiny_gemma3, PROMPT, images, edit=causal)
    assert ids == ids_bi == ids_causal and sum(types) == 16
    to_causal = max(abs(a - b) for a, b in zip(ours, masked, strict=True))
    to_bidirectional = max(abs(a - b) for a, b in zip(ours, bidirectional, strict=True))
    image_rows = [i - 1 for i in range(1, len(ids)) if types[i - 1]]  # predictions made at an image row
    print(f"vLLM 0.32 CPU Gemma 3 prompt log-probs: max |vLLM - transformers causal| = {to_causal:.2e}, "
          f"max |vLLM - transformers bidirectional| = {to_bidirectional:.3f}")
    assert to_causal < 1e-4
    assert max(abs(ours[i] - bidirectional[i]) for i in image_rows) > 1e-2  # the image rows see the whole image there
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert not CPUAttentionBackend.supports_mm_prefix()


def test_ratio_1_equals_vllm_builtin_tokens_and_logprobs(runs):
    assert_ratio_1_equals_builtin(runs)


def test_kept_indices_and_placeholder_counts(runs):
    two = assert_kept_indices(runs, CASES, RATIO)
    assert [rec["total"] for rec in two] == [16, 16]


def test_pruned_equals_otprune_hf_with_vllms_causal_image_mask(runs, tiny_gemma3):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return hf_reference(tiny_gemma3, "Gemma3ForConditionalGeneration", prompt, sized_images(SIZES, seeds), ratio,
                            edit=causal)  # fmt: skip

    assert_matches(runs["plugin"], ("one@0.25", "tall@0.25", "two@0.25", "one@0.5", "one"), reference,
                   "otprune.hf (Gemma 3, causal inside images as vLLM's CPU backend)")  # fmt: skip


def test_a_batch_of_mixed_ratios_gives_each_requests_own_outputs(runs):
    for name in CASES:
        assert_same(runs["batch"][name], runs["plugin"][name], name)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    assert_rounds_same(runs["chunked"], runs["plugin"], RATIO, min_cached=16)


@pytest.fixture(scope="module")
def plugin_checks(tiny_gemma3):
    """One engine of ours (no switches): the pruned prompt's log-probs (image 0 at `RATIO`), and what
    pan-and-scan requests get: the pruning one's error, the crop count of the unpruned one."""
    from conftest import generate
    from vllm import SamplingParams

    crops = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
    wide = image(5, (200, 64))
    out: dict = {}
    with engine(tiny_gemma3, enable_prefix_caching=False) as llm:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        (pruned,) = llm.generate([request(PROMPT, [image(0, SIZES[0])], RATIO)], params, use_tqdm=False)
        ids = list(pruned.prompt_token_ids)
        out["pruned"] = (ids, [entry[ids[i]].logprob for i, entry in enumerate(pruned.prompt_logprobs) if entry is not None])
        scan = {"prompt": PROMPT, "multi_modal_data": {"image": wide}, "mm_processor_kwargs": {**crops, "otprune_ratio": 0.5}}
        try:
            generate(llm, [scan])
        except ValueError as error:
            out["scan_error"] = str(error)
        out["scan_unpruned"] = len(generate(llm, [{**scan, "mm_processor_kwargs": {**crops, "otprune_ratio": 1.0}}])[0][0])
        out["plain"] = len(generate(llm, [request(PROMPT, [wide])])[0][0])
    return out


def test_pruned_prompt_logprobs_equal_otprune_hf_with_the_causal_image_mask(plugin_checks, tiny_gemma3):
    """The discriminating check (the tiny model's last row barely feels the image mask, its image rows do):
    every prompt log-prob of a pruned request equals otprune.hf's with `token_type_ids` zeroed, and
    differs from otprune.hf's own (bidirectional over the kept tokens) on the kept image rows."""
    import transformers

    from otprune import hf

    ids, ours = plugin_checks["pruned"]
    processor = transformers.AutoProcessor.from_pretrained(tiny_gemma3)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    found = {}
    for name, edit in (("bidirectional", None), ("causal", causal)):
        inputs = processor(text=PROMPT, images=[image(0, SIZES[0])], return_tensors="pt")
        inputs = inputs if edit is None else edit(inputs)
        with torch.no_grad(), hf.pruning(model, otprune.PruneConfig(method="otprune", layer=0, ratio=RATIO)):
            logprobs = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)  # (L', V): the pruned sequence
        assert logprobs.shape[0] == len(ids)
        found[name] = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    kept_rows = [i - 1 for i in range(1, len(ids)) if ids[i - 1] == model.config.image_token_id]
    assert len(kept_rows) == round(RATIO * 16)
    to_causal = max(abs(a - b) for a, b in zip(ours, found["causal"], strict=True))
    to_bidirectional = max(abs(ours[i] - found["bidirectional"][i]) for i in kept_rows)
    print(f"vLLM plugin, Gemma 3 pruned to {len(kept_rows)} of 16, prompt log-probs: max |plugin - otprune.hf causal| = "
          f"{to_causal:.2e}, max |plugin - otprune.hf bidirectional| on the kept rows = {to_bidirectional:.3f}")
    assert to_causal < 1e-4
    assert to_bidirectional > 1e-2


def test_pan_and_scan_crops_are_refused_when_pruning_and_served_at_ratio_1(plugin_checks):
    assert "pan-and-scan crops (" in plugin_checks["scan_error"] and "the plugin does not prune them" in plugin_checks["scan_error"]
    assert plugin_checks["scan_unpruned"] > plugin_checks["plain"]  # the crops' tokens are there at ratio 1
