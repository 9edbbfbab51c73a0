"""CDPruner in the vLLM plugin on a tiny LLaVA-1.5 (issue #25 point 1): the processor reads each
prompt's instruction and hands its CLIP ids to the model, which scores the tower's patches with the
CLIP text side of `CDPRUNER_CLIP` (a tiny full CLIP whose vision weights are the checkpoint's tower).

One engine (BASELINE=CDPRUNER SUBSET_RATIO=0.25, prefix caching on): the greedy tokens equal
`otprune.hf`'s CDPruner on transformers' class from the same checkpoint; the same image under two
questions keeps different tokens and never shares the encoder / prefix caches; a request at ratio
1 is the unpruned model. LLaVA-NeXT (anyres, its own engine): two images of different grids, one
request each and both in one batch, against `otprune.hf`.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import MAX_TOKENS, assert_matches, engine, generate, hf_reference, image, request  # noqa: E402

from otprune import serve  # noqa: E402
from otprune.methods.cdpruner import QUESTION_SUFFIX  # noqa: E402

RATIO = 0.25
T = 64  # tokens per image of the tiny checkpoint
QUESTIONS = {"what": "What is in the picture?", "color": "Which colour dominates the top left corner?" + QUESTION_SUFFIX}
PROMPTS = {name: f"USER: <image>\n{q} ASSISTANT:" for name, q in QUESTIONS.items()}
PROMPT2 = "USER: <image>\nand <image>\nCompare them. ASSISTANT:"
CASES = {  # name -> (prompt, image seeds, per-request ratio)
    "what": (PROMPTS["what"], [0], None),
    "color": (PROMPTS["color"], [0], None),
    "two": (PROMPT2, [2, 3], None),
    "what@1.0": (PROMPTS["what"], [0], 1.0),
}


@pytest.fixture(scope="module")
def clip_dir(tiny_llava, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    from otprune.hf.tiny import write_tiny_clip

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32)
    return str(write_tiny_clip(tmp_path_factory.mktemp("vllm-clip") / "clip", model.model.vision_tower))


def _request(name):
    prompt, seeds, ratio = CASES[name]
    return request(prompt, [image(s) for s in seeds], ratio)


@pytest.fixture(scope="module")
def runs(tiny_llava, clip_dir):
    env = {"BASELINE": "CDPRUNER", "SUBSET_RATIO": str(RATIO), "CDPRUNER_CLIP": clip_dir}
    results: dict = {"alone": {}, "records": {}}
    with engine(tiny_llava, env=env, enable_prefix_caching=True, block_size=32) as llm:
        llm.apply_model(lambda model: setattr(model, "otprune_record", []))
        for name in ("what", "color", "what", "two", "what@1.0"):  # "color" after "what": same image, other question
            results["alone"].setdefault(name, []).append(generate(llm, [_request(name)])[0])
            results["records"].setdefault(name, []).append(llm.apply_model(lambda m: list(m.otprune_record))[0])
            llm.apply_model(lambda m: m.otprune_record.clear())
        results["batch"] = dict(zip(CASES, generate(llm, [_request(n) for n in CASES]), strict=True))
    return results


def test_pruned_tokens_equal_otprune_hf(runs, tiny_llava, clip_dir):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return hf_reference(tiny_llava, "LlavaForConditionalGeneration", prompt, [image(s) for s in seeds],
                            RATIO if ratio is None else ratio, method="cdpruner", clip=clip_dir)  # fmt: skip

    alone = {name: outs[0] for name, outs in runs["alone"].items()}
    for name in CASES:
        expected = reference(name)
        assert_matches(alone, [name], lambda _n, e=expected: e, "otprune.hf CDPruner", all_tokens=False)
        tokens = expected[1]  # transformers stops at the end-of-sequence token, vLLM (ignore_eos) goes on
        assert alone[name][1][:len(tokens)] == tokens, name
        assert len(tokens) == MAX_TOKENS or tokens[-1] == 2, name  # the tiny tokenizer's </s>
    assert len(alone["what"][0]) == len(alone["what@1.0"][0]) - T + round(RATIO * T)
    assert {name: out[:2] for name, out in runs["batch"].items()} == {name: out[:2] for name, out in alone.items()}
    assert runs["alone"]["what"][1][:2] == runs["alone"]["what"][0][:2]  # again, after "color" (cache hit or not)
    assert all(len(out[1]) == MAX_TOKENS for out in alone.values())


def test_the_question_decides_the_kept_tokens_and_no_cache_is_shared(runs):
    what, color = runs["records"]["what"][0], runs["records"]["color"][0]
    assert len(what) == 1 and len(color) == 1, "the tower ran for each question: the encoder cache was not shared"
    assert torch.allclose(what[0]["features"], color[0]["features"], atol=1e-6)  # the same image
    assert not torch.equal(what[0]["kept"], color[0]["kept"])  # another question, other tokens
    assert runs["alone"]["color"][0][3] == 0  # its first block holds the image: no prefix-cache hit
    assert runs["alone"]["what"][1][3] > 0  # the same prompt again: the prefix cache is on and hit
    assert runs["records"]["what@1.0"][0] == []  # ratio 1: nothing selected


def test_the_instruction_is_in_the_hash_and_the_identity():
    config = serve.engine_config({"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.25", "CDPRUNER_CLIP": "/clip"})
    one, other = serve.pruning_identity(config, None, "a"), serve.pruning_identity(config, None, "b")
    assert one != other and "instruction='a'" in one
    assert serve.pruning_identity(config, 1.0, "a") == serve.pruning_identity(config, 1.0, "b") == "unpruned"
    with pytest.raises(ValueError, match="set CDPRUNER_CLIP"):
        serve.engine_config({"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.25"})
    with pytest.raises(ValueError, match="LLaVA-NeXT.*only, not for Qwen2_5_VLForConditionalGeneration"):
        serve.check_architecture("Qwen2_5_VLForConditionalGeneration",
                                 {"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.25", "CDPRUNER_CLIP": "/clip"})


SIZES = {"wide": (160, 90), "tall": (90, 150)}  # different anyres grids


@pytest.fixture(scope="module")
def next_runs(tiny_llava_next, tmp_path_factory):
    from transformers import LlavaNextForConditionalGeneration

    from otprune.hf.tiny import write_tiny_clip

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next, dtype=torch.float32)
    clip = str(write_tiny_clip(tmp_path_factory.mktemp("vllm-clip-next") / "clip", model.model.vision_tower))
    env = {"BASELINE": "CDPRUNER", "SUBSET_RATIO": str(RATIO), "CDPRUNER_CLIP": clip}
    requests = {name: request(PROMPTS["color"], [image(5, size)]) for name, size in SIZES.items()}
    with engine(tiny_llava_next, env=env, enable_prefix_caching=False) as llm:
        alone = {name: generate(llm, [req])[0] for name, req in requests.items()}
        batch = dict(zip(requests, generate(llm, list(requests.values())), strict=True))
    return clip, alone, batch


def test_llava_next_pruned_tokens_equal_otprune_hf(next_runs, tiny_llava_next):
    clip, alone, batch = next_runs
    for name, size in SIZES.items():
        expected = hf_reference(tiny_llava_next, "LlavaNextForConditionalGeneration", PROMPTS["color"], [image(5, size)],
                                RATIO, method="cdpruner", clip=clip)  # fmt: skip
        assert_matches(alone, [name], lambda _n, e=expected: e, "otprune.hf CDPruner (LLaVA-NeXT)", all_tokens=False)
        assert alone[name][1][:len(expected[1])] == expected[1], name
        assert len(expected[1]) == MAX_TOKENS or expected[1][-1] == 2, name
    assert {n: out[:2] for n, out in batch.items()} == {n: out[:2] for n, out in alone.items()}
