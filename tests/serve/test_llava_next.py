"""The plugin's LLaVA-NeXT (anyres: base crop + unpadded grid + newline rows, pruned jointly)
against `otprune.hf` on the same tiny checkpoint, and the kept indices against select_tokens."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import MAX_TOKENS, PROMPT, engine, generate, image, request

import otprune  # noqa: E402

RATIO = 0.25
SIZES = {"wide": (160, 90), "tall": (90, 150)}  # different anyres grids -> different T per image


@pytest.fixture(scope="module")
def runs(tiny_llava_next):
    out = {}
    with engine(tiny_llava_next, enable_prefix_caching=False) as llm:
        llm.apply_model(lambda model: setattr(model, "otprune_record", []))
        for name, size in SIZES.items():
            for ratio in (1.0, RATIO):
                out[name, ratio] = generate(llm, [request(PROMPT, [image(5, size)], ratio)])[0]
                out[name, ratio, "records"] = llm.apply_model(lambda model: list(model.otprune_record))[0]
                llm.apply_model(lambda model: model.otprune_record.clear())
    return out


def _hf(path, size, ratio):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from otprune import hf

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=PROMPT, images=[image(5, size)], return_tensors="pt")
    with torch.no_grad(), hf.pruning(model, otprune.PruneConfig(method="otprune", layer=0, ratio=ratio)) as adapter:
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
        stats = adapter.last_stats[0]
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return stats, tokens, torch.log_softmax(out.scores[0][0].float(), dim=-1)


@pytest.mark.parametrize("name", list(SIZES))
def test_llava_next_pruned_equals_otprune_hf(runs, tiny_llava_next, name):
    stats, tokens, first = _hf(tiny_llava_next, SIZES[name], RATIO)
    full_prompt, _, _, _ = runs[name, 1.0]
    prompt, ours, ours_first, _ = runs[name, RATIO]
    total = stats["image_tokens_before"][0]
    assert len(full_prompt) == stats["seq_len_before"]  # vLLM's anyres count = transformers'
    assert len(prompt) == stats["seq_len_after"] == len(full_prompt) - total + round(RATIO * total)
    assert ours == tokens
    diff = max(abs(lp - float(first[tok])) for tok, lp in ours_first.items())
    print(f"llava_next {name}: T={total}, K={round(RATIO * total)}, first-step log-prob max diff {diff:.2e}")
    assert diff < 1e-4
    (record,) = runs[name, RATIO, "records"]
    assert record["total"] == total
    assert torch.equal(record["kept"], otprune.select_tokens(record["features"], RATIO))
    assert runs[name, 1.0, "records"] == []
