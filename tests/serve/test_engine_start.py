"""What the plugin checks when an engine starts (issue 22, points 6 and 7), on tiny checkpoints.

- Every bad switch setting stops the engine at start, in the front end (vLLM resolves the
  architecture while it builds the engine's config), with a message naming the switch: merge
  methods, `SUBSET_RATIO=iqr`, pruning inside the LLM, malformed values.
- With a pruning switch set, an architecture the plugin does not prune (vLLM's own LLaVA and
  OneVision classes) refuses to start, naming the ones it prunes.
- Without switches the serve venv starts the plugin's Qwen2.5-VL and LLaVA-OneVision (their video
  processors are stand-ins: scripts/serve_venv_fixup.py) and serves images unpruned; Qwen2.5-VL
  serves videos too (torchless video processor), a OneVision video request fails alone, the engine
  keeps serving.
- The engine's defaults (not only the request's key) enter vLLM's multimodal hash.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

from conftest import assert_same, engine, generate, image, request  # noqa: E402

PRUNING = {"BASELINE": "OURS", "SUBSET_RATIO": "0.25"}
PRUNED_NAMES = (r"LlavaForConditionalGeneration \(LLaVA-1\.5\), LlavaNextForConditionalGeneration \(LLaVA-NeXT\), "
                r"Qwen2_5_VLForConditionalGeneration \(Qwen2\.5-VL, images, videos\), "
                r"LlavaOnevisionForConditionalGeneration \(LLaVA-OneVision, images\), "
                r"Qwen3VLForConditionalGeneration \(Qwen3-VL, images, videos\), "
                r"InternVLForConditionalGeneration \(InternVL \(HF format\), images\), "
                r"Gemma3ForConditionalGeneration \(Gemma 3, images without pan-and-scan\)")

BAD_SETTINGS = [  # (environment, what the error says)
    ({"BASELINE": "PRUMERGE_PLUS", "SUBSET_RATIO": "0.25"}, r"BASELINE=PRUMERGE_PLUS: PruMerge\+ merges tokens inside the vision tower"),
    ({"BASELINE": "PRUMERGE"}, r"BASELINE=PRUMERGE: PruMerge merges tokens inside the vision tower"),
    ({"SUBSET_RATIO": "iqr"}, r"SUBSET_RATIO='iqr' \(PruMerge's adaptive per-image budget"),
    ({"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "IQR"}, r"SUBSET_RATIO='iqr'"),
    ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, r"BASELINE=FASTV LAYER_INDEX=2: .*before the LLM only"),
    ({"LAYER_INDEX": "2", "SUBSET_RATIO": "0.5"}, r"LAYER_INDEX=2: .*before the LLM only"),
    ({"SUBSET_RATIO": "abc"}, r"SUBSET_RATIO='abc': not a number"),
    ({"SUBSET_RATIO": "1e400"}, r"SUBSET_RATIO='1e400'"),
    ({"BASELINE": "NOPE"}, r"BASELINE='NOPE': unknown method"),
    ({"SUBSET_RATIO": "0.25", "OTPRUNE_GAMMA": "x"}, r"OTPRUNE_GAMMA"),
]


@pytest.mark.parametrize("env, message", BAD_SETTINGS, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in BAD_SETTINGS])
def test_bad_settings_refuse_to_start(tiny_llava, env, message):
    with pytest.raises(Exception, match=message), engine(tiny_llava, env=env):
        pass




def test_switches_on_an_architecture_the_plugin_does_not_prune_refuse_to_start(tiny_llava, tiny_onevision):
    cases = [(tiny_onevision, "VllmLlavaOnevisionForConditionalGeneration", "VllmLlavaOnevisionForConditionalGeneration"),
             (tiny_llava, "VllmLlavaForConditionalGeneration", "VllmLlavaForConditionalGeneration")]  # fmt: skip
    for model, arch, name in cases:
        for env in (PRUNING, {"SUBSET_RATIO": "0.5"}, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.1"}):
            with pytest.raises(Exception, match=rf"architecture {name} is not one the plugin prunes: {PRUNED_NAMES}"):
                with engine(model, arch=arch, env=env):
                    pass


QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
QWEN_VIDEO = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
ONEVISION_PROMPT = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
ONEVISION_VIDEO = "<|im_start|>user\n<video>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
INTERNVL_PROMPT = "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
GEMMA3_PROMPT = "<bos><start_of_turn>user\n<start_of_image>What is it?<end_of_turn>\n<start_of_turn>model\n"


def _torchless(error: BaseException) -> bool:
    """True when the stand-in video processor's message is in `error`'s chain (vLLM wraps it)."""
    while error is not None:
        if "this venv has no torchvision" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _serves_images_unpruned(model, prompt, video_prompt, image_token, video_limit=1, videos=False):
    """Images served unpruned; a video served (`videos`) or refused alone (the engine keeps serving)."""
    import numpy as np
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3],
                "video_backend": "opencv", "do_sample_frames": False}  # fmt: skip
    video = (frames, metadata)
    with engine(model, limit_mm_per_prompt={"image": 1, "video": video_limit}) as llm:
        first = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image(0)}}, params, use_tqdm=False)[0]
        if videos:
            served = llm.generate({"prompt": video_prompt, "multi_modal_data": {"video": video}}, params, use_tqdm=False)
            assert len(served[0].outputs[0].token_ids) == 3
        else:
            with pytest.raises(Exception) as refused:  # noqa: PT011 - vLLM wraps the processor's ImportError
                llm.generate({"prompt": video_prompt, "multi_modal_data": {"video": video}}, params, use_tqdm=False)
            assert _torchless(refused.value) if video_limit else "video" in str(refused.value), str(refused.value)[:300]
        again = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image(0)}}, params, use_tqdm=False)[0]
        text = llm.generate({"prompt": "Hello"}, params, use_tqdm=False)[0]
    assert len(first.outputs[0].token_ids) == 3 and len(text.outputs[0].token_ids) == 3
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    return list(first.prompt_token_ids).count(image_token)


def test_qwen2_5_vl_starts_and_serves_images_and_videos_unpruned(tiny_qwen):
    from otprune.hf.qwen2_5_vl_tiny import SPECIAL_IDS

    tokens = _serves_images_unpruned(tiny_qwen, QWEN_PROMPT, QWEN_VIDEO, SPECIAL_IDS["<|image_pad|>"], videos=True)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen)
    expected = processor(text=QWEN_PROMPT, images=[image(0)], return_tensors="pt")["input_ids"]
    assert tokens == int((expected == SPECIAL_IDS["<|image_pad|>"]).sum()) > 0  # every visual token: unpruned


def test_onevision_starts_and_serves_images_unpruned(tiny_onevision):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_onevision)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    # the plugin counts OneVision's video budget from the frame geometry (vLLM's own class processes a
    # dummy video at start, which needs torchvision): the engine starts with videos allowed, and a video
    # request fails alone with the stand-in's message
    tokens = _serves_images_unpruned(tiny_onevision, ONEVISION_PROMPT, ONEVISION_VIDEO, image_token)
    expected = processor(text=ONEVISION_PROMPT, images=[image(0)], return_tensors="pt")["input_ids"]
    assert tokens == int((expected == image_token).sum()) > 0


def test_internvl_starts_with_videos_allowed_and_serves_images_unpruned(tiny_internvl):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_internvl)
    image_token = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    # as OneVision: the plugin counts InternVL's video budget (one 16-token tile per frame) without
    # processing a dummy video, so the engine starts with videos allowed; a video request fails alone
    video_prompt = INTERNVL_PROMPT.replace("<IMG_CONTEXT>", "<video>")
    tokens = _serves_images_unpruned(tiny_internvl, INTERNVL_PROMPT, video_prompt, image_token)
    expected = processor(text=INTERNVL_PROMPT, images=[image(0)], return_tensors="pt")["input_ids"]
    assert tokens == int((expected == image_token).sum()) > 0


def _hashes(model: str, env: dict, monkeypatch, request: dict | None = None) -> list[str]:
    """vLLM's multimodal hash of one image, as the plugin's processor computes it under `env`."""
    from conftest import SWITCHES
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = ModelConfig(model=model, dtype="float32", max_model_len=1024)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    items = processor.info.parse_mm_data({"image": image(0)})
    inputs = ProcessorInputs(prompt=[1, 2, 3], mm_data_items=items, hf_processor_mm_kwargs=request or {})
    return processor._get_mm_hashes(inputs)["image"]


def test_the_engines_default_ratio_and_method_enter_the_multimodal_hash(tiny_llava, monkeypatch):
    settings = [{}, {"SUBSET_RATIO": "0.25"}, {"SUBSET_RATIO": "0.5"}, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.25"},
                {"SUBSET_RATIO": "0.25", "OTPRUNE_GAMMA": "0.05"}, {"SUBSET_RATIO": "0.25", "OTPRUNE_ORDER": "official"}]  # fmt: skip
    hashes = [_hashes(tiny_llava, env, monkeypatch) for env in settings]
    assert len({tuple(h) for h in hashes}) == len(settings), hashes  # engines that prune differently never share
    assert _hashes(tiny_llava, {"SUBSET_RATIO": "0.25"}, monkeypatch) == hashes[1]  # deterministic
    # a request's ratio: the engine's method and parameters still count
    one = _hashes(tiny_llava, {}, monkeypatch, {"otprune_ratio": 0.25})
    assert one != _hashes(tiny_llava, {"OTPRUNE_GAMMA": "0.05"}, monkeypatch, {"otprune_ratio": 0.25})
    assert one != _hashes(tiny_llava, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"}, monkeypatch, {"otprune_ratio": 0.25})
    # ratio 1: the image's rows are the tower's whatever the engine's method
    assert _hashes(tiny_llava, {"SUBSET_RATIO": "0.25"}, monkeypatch, {"otprune_ratio": 1.0}) == _hashes(
        tiny_llava, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"}, monkeypatch, {"otprune_ratio": 1.0})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "onevision", "qwen3_vl", "internvl", "gemma3"])
def test_the_new_families_processors_emit_per_request_stats(family, tiny_qwen, tiny_onevision, tiny_qwen3_vl,
                                                            tiny_internvl, tiny_gemma3, monkeypatch):  # fmt: skip
    """What lmms-eval's `--model vllm` records for a request (no engine: vLLM's front-end processing)."""
    from conftest import SWITCHES
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.plugins import load_general_plugins

    from otprune import stats

    load_general_plugins()
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    model = {"qwen2_5_vl": tiny_qwen, "onevision": tiny_onevision, "qwen3_vl": tiny_qwen3_vl, "internvl": tiny_internvl,
             "gemma3": tiny_gemma3}[family]  # fmt: skip
    prompt = {"onevision": ONEVISION_PROMPT, "internvl": INTERNVL_PROMPT, "gemma3": GEMMA3_PROMPT}.get(family, QWEN_PROMPT)
    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=model, dtype="float32", max_model_len=1024))
    tokenizer = processor.info.get_tokenizer()
    seen = []

    def listener(records, **context):
        seen.extend(records)

    stats.add_listener(listener)
    try:
        items = processor.info.parse_mm_data({"image": image(0)})
        inputs = ProcessorInputs(prompt=tokenizer.encode(prompt), mm_data_items=items,
                                 hf_processor_mm_kwargs={"otprune_ratio": 0.25})  # fmt: skip
        result = processor.apply(inputs, TimingContext(enabled=False))
    finally:
        stats.remove_listener(listener)
    (record,) = seen
    (total,), (keep,) = record.image_tokens_before, record.image_tokens_after
    assert keep == round(0.25 * total) and total > keep
    assert record.text_tokens + keep == len(result["prompt_token_ids"])  # text rows: <img> / </img> etc. included


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_pruned_videos_are_in_the_per_request_stats(family, tiny_qwen, tiny_qwen3_vl, monkeypatch):
    """A request with a video and an image: each is one token set in the stats lmms-eval's `--model vllm`
    records (videos first), K = round(r * T); the text count is the prompt's other rows (Qwen3-VL's
    timestamps between the frames included)."""
    from conftest import SWITCHES, video
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.plugins import load_general_plugins

    from otprune import stats

    load_general_plugins()
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    model = {"qwen2_5_vl": tiny_qwen, "qwen3_vl": tiny_qwen3_vl}[family]
    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=model, dtype="float32", max_model_len=2048))
    prompt = QWEN_VIDEO.replace("What is it?", "<|vision_start|><|image_pad|><|vision_end|>What is it?")
    seen = []

    def listener(records, **context):
        seen.extend(records)

    stats.add_listener(listener)
    try:
        items = processor.info.parse_mm_data({"video": video(0, 4, 64, 64), "image": image(0)})
        inputs = ProcessorInputs(prompt=processor.info.get_tokenizer().encode(prompt), mm_data_items=items,
                                 hf_processor_mm_kwargs={"otprune_ratio": 0.25})  # fmt: skip
        result = processor.apply(inputs, TimingContext(enabled=False))
    finally:
        stats.remove_listener(listener)
    (record,) = seen
    assert len(record.image_tokens_before) == 2  # the video, then the image
    for total, keep in zip(record.image_tokens_before, record.image_tokens_after, strict=True):
        assert keep == round(0.25 * total) and total > keep
    assert record.text_tokens + sum(record.image_tokens_after) == len(result["prompt_token_ids"])


def test_vllms_own_video_pruning_with_the_plugin_refuses_to_start(tiny_qwen):
    with pytest.raises(Exception, match=r"cannot run with vLLM's video pruning \(--video-pruning-rate"):
        with engine(tiny_qwen, video_pruning_rate=0.5, limit_mm_per_prompt={"image": 1, "video": 0}):
            pass


def test_a_pruning_request_to_a_model_the_plugin_does_not_prune_fails_alone(tiny_llava):
    """Without switches any architecture serves; a request asking for pruning (otprune_ratio < 1) on
    one the plugin does not prune (here vLLM's own LLaVA class) fails, naming the key and the
    architecture, never served unpruned; the engine keeps serving, otprune_ratio=1.0 included."""
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    with engine(tiny_llava, arch="VllmLlavaForConditionalGeneration", enable_prefix_caching=False) as llm:
        with pytest.raises(Exception, match=r"otprune_ratio=0\.5 asks for pruning.*VllmLlavaForConditionalGeneration"):
            generate(llm, [request(prompt, [image(0)], 0.5)])
        plain, at_one = generate(llm, [request(prompt, [image(0)]), request(prompt, [image(0)], 1.0)])
        assert_same(at_one, plain, "otprune_ratio=1.0", tol=1e-5)


def test_vllms_own_pruning_hook_is_off_on_the_cpu_runner(tiny_qwen):
    """The minimal reproduction of why the plugin carries M-RoPE positions itself (`otprune/serve/_mrope.py`):
    vLLM 0.32's interface for re-positioning pruned tokens (`recompute_mrope_positions`, its video pruning)
    runs only when the runner's `is_multimodal_pruning_enabled` is set, which `GPUModelRunner.load_model`
    does from `--video-pruning-rate`; the CPU runner's `load_model` never does. Here vLLM's own Qwen2.5-VL
    class with `video_pruning_rate=0.5`: the engine config asks for pruning, the runner stays off."""
    with engine(tiny_qwen, arch="VllmQwen2_5_VLForConditionalGeneration", video_pruning_rate=0.5,
                limit_mm_per_prompt={"image": 1, "video": 0}) as llm:  # fmt: skip
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        assert llm.llm_engine.vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled()
        assert type(runner).__name__ == "CPUModelRunner" and runner.is_multimodal_pruning_enabled is False
