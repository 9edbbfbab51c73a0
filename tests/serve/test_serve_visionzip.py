"""VisionZip in the vLLM plugin (issue #25): merged inside vLLM's CLIP tower, K rows per image.

One engine with BASELINE=VISIONZIP SUBSET_RATIO=0.25 on the tiny LLaVA-1.5 (64 patches per image,
2 CLIP layers; `vision_feature_layer` -2: layer 0 produces the selected hidden state):

- greedy tokens, prompt length and first-step log-probs equal `otprune.hf`'s VisionZip on
  transformers' LlavaForConditionalGeneration from the same checkpoint (one image at the engine's
  ratio and at 0.5 per request, two images, ratio 1.0 unpruned);
- the K rows vLLM received per image equal (within 1e-5) an independent computation from
  transformers' public pieces: CLIPVisionModel's hidden states, the producing layer's q / k
  projections of its layer-normed input, `otprune.methods.visionzip.visionzip`, the projector;
- a second engine (prefix caching, 24-token prefill chunks, the requests in one batch, twice) gives
  every request the outputs it got alone;
- LLaVA-NeXT (each anyres crop merged on its own): the same two checks;
- a tower without a CLS token (OneVision's SigLIP) refuses VisionZip at engine start;
- the multimodal hash (`pruning_identity`) tells VisionZip from the other methods at one ratio.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import (  # noqa: E402
    PROMPT,
    PROMPT2,
    assert_matches,
    assert_same,
    engine,
    generate,
    hf_reference,
    image,
    request,
)

from otprune import serve  # noqa: E402
from otprune.methods.prumerge import NoClsTokenError  # noqa: E402

RATIO = 0.25
T = 64  # patches per image of the tiny checkpoint (112 px, 14 px patches)
ENV = {"BASELINE": "VISIONZIP", "SUBSET_RATIO": str(RATIO)}
CASES = {  # name -> (prompt, image seeds, per-request ratio)
    "one": (PROMPT, [0], None),
    "one@0.5": (PROMPT, [0], 0.5),
    "one@1.0": (PROMPT, [0], 1.0),
    "other": (PROMPT, [1], None),
    "two": (PROMPT2, [2, 3], None),
}


def _request(name):
    prompt, seeds, ratio = CASES[name]
    return request(prompt, [image(s) for s in seeds], ratio)


@pytest.fixture(scope="module")
def runs(tiny_llava):
    results: dict = {"plugin": {}, "records": {}}
    with engine(tiny_llava, env=ENV, enable_prefix_caching=False) as llm:
        llm.apply_model(lambda model: setattr(model, "otprune_record", []))
        for name in CASES:  # one at a time, so each request's records are its own
            results["plugin"][name] = generate(llm, [_request(name)])[0]
            results["records"][name] = llm.apply_model(lambda model: list(model.otprune_record))[0]
            llm.apply_model(lambda model: model.otprune_record.clear())
        results["batch"] = dict(zip(CASES, generate(llm, [_request(n) for n in CASES]), strict=True))
    with engine(
        tiny_llava, env=ENV, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=24,
        max_num_seqs=4, block_size=32,
    ) as llm:  # fmt: skip
        results["chunked"] = [dict(zip(CASES, generate(llm, [_request(n) for n in CASES]), strict=True)) for _ in range(2)]
    return results


def test_placeholders_are_visionzip_budgets(runs):
    unpruned = len(runs["plugin"]["one@1.0"][0])  # the prompt with T = 64 placeholders
    for name, visual in (("one", 16), ("one@0.5", 32), ("other", 16)):  # round(r 64), CLS row included
        assert len(runs["plugin"][name][0]) == unpruned - T + visual, name
    assert [r["keep"] for r in runs["records"]["one"]] == [16]
    assert [r["keep"] for r in runs["records"]["one@0.5"]] == [32]
    assert runs["records"]["one@1.0"] == []  # ratio 1: vLLM's own rows, nothing merged
    assert [r["keep"] for r in runs["records"]["two"]] == [16, 16]


def test_greedy_tokens_equal_otprune_hf(runs, tiny_llava):
    def reference(name):
        prompt, seeds, ratio = CASES[name]
        return hf_reference(tiny_llava, "LlavaForConditionalGeneration", prompt, [image(s) for s in seeds],
                            RATIO if ratio is None else ratio, method="visionzip")  # fmt: skip

    assert_matches(runs["plugin"], list(CASES), reference, "otprune.hf VisionZip")


def test_batch_equals_alone(runs):
    for name in CASES:
        alone, batch = runs["plugin"][name], runs["batch"][name]
        assert batch[0] == alone[0] and batch[1] == alone[1], name


def test_chunked_prefill_and_prefix_cache_give_the_same_outputs(runs):
    """24-token prefill chunks (each image's placeholders span several), mixed ratios in one batch, the
    second round reading the prefix cache: the outputs of each request alone."""
    for round_ in runs["chunked"]:
        for name, ours in round_.items():
            assert_same(ours, runs["plugin"][name], name)
    assert runs["chunked"][1]["two"][3] > 0  # the second round read cached blocks


def _independent_rows(path: str, img, k: int, model_class: str = "LlavaForConditionalGeneration"):
    """VisionZip's projected rows of one image from transformers' public pieces (no otprune.hf): per
    CLIP crop (LLaVA-NeXT: base + grid crops, in order) k tokens, the crops' rows concatenated."""
    import transformers
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from otprune.methods.visionzip import visionzip

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, model_class).from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=PROMPT, images=[img], return_tensors="pt")
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: (1, crops padded, 3, H, W)
        crops = image_size_to_num_patches(image_size=inputs["image_sizes"][0].tolist(), patch_size=model.config.vision_config.image_size,
                                          grid_pinpoints=model.config.image_grid_pinpoints)  # fmt: skip
        pixels = pixels[0, :crops]
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    select = model.config.vision_feature_layer  # -2 of len(layers) + 1 hidden states
    produced = select % (len(layers) + 1)  # hidden state index; layer produced - 1 produces it
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True).hidden_states
        block = layers[produced - 1]
        normed = block.layer_norm1(states[produced - 1])
        q, keys = block.self_attn.q_proj(normed), block.self_attn.k_proj(normed)
        tokens, sources = visionzip(states[produced], q[:, 0], keys, model.config.vision_config.num_attention_heads, k)
        rows = model.model.multi_modal_projector(tokens.reshape(-1, tokens.shape[-1]))
    n = states[produced].shape[1] - 1
    sources = torch.where(sources < 0, sources, sources + torch.arange(sources.shape[0])[:, None] * n)
    return rows, sources.reshape(-1)


def test_rows_equal_an_independent_computation(runs, tiny_llava):
    for name, seed, k in (("one", 0, 16), ("one@0.5", 0, 32), ("other", 1, 16)):
        (record,) = runs["records"][name]
        rows, sources = _independent_rows(tiny_llava, image(seed), k)
        assert record["rows"].shape == rows.shape == (k, rows.shape[1])
        assert torch.equal(record["sources"], sources), name
        diff = float((record["rows"] - rows).abs().max())
        print(f"{name}: max |vLLM rows - independent| = {diff:.2e}")
        assert diff < 1e-5, (name, diff)


def test_tower_without_cls_token_is_refused_at_engine_start(tiny_onevision):
    with pytest.raises(Exception, match="no CLS token") as err:
        with engine(tiny_onevision, env=ENV, limit_mm_per_prompt={"image": 1, "video": 0}):
            pass
    assert "VISIONZIP" in str(err.value)


@pytest.mark.parametrize("arch", ["Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                                  "LlavaOnevisionForConditionalGeneration"])
def test_no_cls_architectures_refuse_visionzip(arch):
    with pytest.raises(NoClsTokenError, match=f"VISIONZIP.*{arch}"):
        serve.check_architecture(arch, ENV)
    assert serve.check_architecture("LlavaForConditionalGeneration", ENV).method == "visionzip"
    assert serve.check_architecture("LlavaNextForConditionalGeneration", ENV).method == "visionzip"


def test_adaptive_budget_refused():
    with pytest.raises(ValueError, match="SUBSET_RATIO=.iqr.*give a fixed ratio"):
        serve.engine_config({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "iqr"})


def test_hash_tells_visionzip_from_other_methods():
    identities = {method: serve.pruning_identity(serve.engine_config({"BASELINE": method, "SUBSET_RATIO": str(RATIO)}))
                  for method in ("VISIONZIP", "OURS", "DIVPRUNE", "UNIFORM")}  # fmt: skip
    assert len(set(identities.values())) == len(identities), identities
    assert identities["VISIONZIP"].startswith("visionzip r=0.25")
    other = serve.engine_config({"BASELINE": "VISIONZIP", "SUBSET_RATIO": str(RATIO), "VISIONZIP_CONTEXTUAL": "0.25"})
    assert serve.pruning_identity(other) != identities["VISIONZIP"]  # its parameter too
    zip_engine = serve.engine_config(ENV)
    assert serve.pruning_identity(zip_engine, 0.5) != serve.pruning_identity(serve.engine_config({}), 0.5)
    assert serve.pruning_identity(zip_engine, 1.0) == "unpruned"


# ---------------------------------------------------------------- LLaVA-NeXT: per anyres crop
NEXT_SIZES = {"wide": (160, 90), "tall": (90, 150)}  # different anyres grids; crops of 16 patches
NEXT_CASES = {  # name -> (image size, per-request ratio)
    "wide": ("wide", None), "tall": ("tall", None), "wide@0.5": ("wide", 0.5), "wide@1.0": ("wide", 1.0),
}


@pytest.fixture(scope="module")
def next_runs(tiny_llava_next):
    results: dict = {"plugin": {}, "records": {}}
    with engine(tiny_llava_next, env=ENV, enable_prefix_caching=False) as llm:
        llm.apply_model(lambda model: setattr(model, "otprune_record", []))
        for name, (size, ratio) in NEXT_CASES.items():
            results["plugin"][name] = generate(llm, [request(PROMPT, [image(5, NEXT_SIZES[size])], ratio)])[0]
            results["records"][name] = llm.apply_model(lambda model: list(model.otprune_record))[0]
            llm.apply_model(lambda model: model.otprune_record.clear())
        two = request(PROMPT2, [image(5, NEXT_SIZES["wide"]), image(6, NEXT_SIZES["tall"])])
        results["plugin"]["two"] = generate(llm, [two])[0]
    return results


def test_llava_next_greedy_tokens_equal_otprune_hf(next_runs, tiny_llava_next):
    def reference(name):
        if name == "two":
            return hf_reference(tiny_llava_next, "LlavaNextForConditionalGeneration", PROMPT2,
                                [image(5, NEXT_SIZES["wide"]), image(6, NEXT_SIZES["tall"])], RATIO, method="visionzip")
        size, ratio = NEXT_CASES[name]
        return hf_reference(tiny_llava_next, "LlavaNextForConditionalGeneration", PROMPT, [image(5, NEXT_SIZES[size])],
                            RATIO if ratio is None else ratio, method="visionzip")  # fmt: skip

    assert_matches(next_runs["plugin"], [*NEXT_CASES, "two"], reference, "otprune.hf VisionZip (LLaVA-NeXT)")
    assert next_runs["records"]["wide@1.0"] == []


@pytest.mark.parametrize("name, k", [("wide", 4), ("tall", 4), ("wide@0.5", 8)])  # per crop of 16 patches
def test_llava_next_rows_equal_an_independent_computation(next_runs, tiny_llava_next, name, k):
    (record,) = next_runs["records"][name]
    size = NEXT_SIZES[NEXT_CASES[name][0]]
    rows, sources = _independent_rows(tiny_llava_next, image(5, size), k, "LlavaNextForConditionalGeneration")
    assert record["keep"] == rows.shape[0] and rows.shape[0] // k > 1  # k per crop: base crop + grid crops
    assert torch.equal(record["sources"], sources), name
    diff = float((record["rows"] - rows).abs().max())
    print(f"llava_next {name}: max |vLLM rows - independent| = {diff:.2e}")
    assert diff < 1e-5, (name, diff)
