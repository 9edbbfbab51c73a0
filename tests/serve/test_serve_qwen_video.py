"""Exactness of the vLLM plugin on VIDEOS of a tiny Qwen2.5-VL and a tiny Qwen3-VL (issue 24, points 1 and 4).

Each video is one token set (all its frames), K = round(r * T) kept, every kept token (and, on
Qwen3-VL, every timestamp / frame-marker token between the frames) at its unpruned M-RoPE
position. The videos are raw frames (T, H, W, 3) with vLLM's metadata (fps 1, not resampled: on
Qwen2.5-VL `second_per_grid_ts` = 2, so the time positions step by 2 per frame pair), processed
in this venv by the torchless video processors of scripts/serve_venv_fixup.py.

Engines per family (one after another, each shut down before the next starts):

- builtin: vLLM's own class; its positions on the unpruned prompts are recorded (the oracle);
- plugin:  ours, switches unset, ratios per request, each request alone (kept indices and the
  prefill's positions recorded), then all in one batch;
- chunked: ours, SUBSET_RATIO=0.25, prefix caching on, 8-token prefill chunks (each video's
  region spans many chunks), mixed per-request ratios in one batch, run twice (the second round
  reads the prefix cache).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

import torch  # noqa: E402
from conftest import (
    MAX_TOKENS,
    assert_same,
    assert_same_as_builtin,  # noqa: E402
    engine,
    generate,
    hf_inputs,
    image,
    main_venv_env,
    main_venv_python,
    video,
)

import otprune  # noqa: E402

IPAD = "<|vision_start|><|image_pad|><|vision_end|>"
VPAD = "<|vision_start|><|video_pad|><|vision_end|>"
PROMPT_V = f"<|im_start|>user\n{VPAD}What happens?<|im_end|>\n<|im_start|>assistant\n"
PROMPT_IV = f"<|im_start|>user\n{IPAD}and then {VPAD}Compare.<|im_end|>\n<|im_start|>assistant\n"
PROMPT_VV = f"<|im_start|>user\n{VPAD}and {VPAD}Compare.<|im_end|>\n<|im_start|>assistant\n"
VIDEOS = {0: (8, 112, 168), 1: (6, 140, 112), 2: (4, 64, 96)}  # seed -> (frames, height, width)
IMAGE_SIZE = (112, 84)  # (width, height)
CASES = {  # name -> (prompt, image seeds, video seeds, per-request ratio)
    "v": (PROMPT_V, [], [0], None),
    "v@1.0": (PROMPT_V, [], [0], 1.0),
    "v@0.5": (PROMPT_V, [], [0], 0.5),
    "v@0.25": (PROMPT_V, [], [0], 0.25),
    "w@1.0": (PROMPT_V, [], [1], 1.0),
    "w@0.25": (PROMPT_V, [], [1], 0.25),
    "iv": (PROMPT_IV, [0], [2], None),  # its own video: each video and ratio is encoded (and recorded) once
    "iv@0.25": (PROMPT_IV, [0], [2], 0.25),
    "x@1.0": (PROMPT_V, [], [2], 1.0),
    "x@0.5": (PROMPT_V, [], [2], 0.5),
    "xw": (PROMPT_VV, [], [2, 1], None),  # two videos, a ratio not used before (each set recorded)
    "xw@0.75": (PROMPT_VV, [], [2, 1], 0.75),
}
PRUNED = {"v@0.5": "v", "v@0.25": "v", "w@0.25": "w@1.0", "iv@0.25": "iv", "x@0.5": "x@1.0", "xw@0.75": "xw"}  # pruned case -> its unpruned case
BUILTIN = ["v", "w@1.0", "iv", "xw"]
# chunked engine's request -> the plugin's case with the same ratio. Its items are small: vLLM sizes the
# encoder cache as max(max_num_batched_tokens, its estimate of the largest item), and a Qwen3-VL video's
# pruned region (kept tokens and the timestamp text between frames) is embeddings throughout
CHUNKED = {"iv": "iv@0.25", "x@1.0": "x@1.0", "x@0.5": "x@0.5"}
FAMILIES = {  # family -> (checkpoint fixture, vLLM's own class, transformers' class)
    "qwen2_5_vl": ("tiny_qwen", "VllmQwen2_5_VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("tiny_qwen3_vl", "VllmQwen3VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"),
}
OPTIONS = {"limit_mm_per_prompt": {"image": 1, "video": 2}}


def make_request(name: str) -> dict:
    prompt, images, videos, ratio = CASES[name]
    data = {}
    if images:
        data["image"] = image(images[0], IMAGE_SIZE)
    if videos:
        items = [video(seed, *VIDEOS[seed]) for seed in videos]
        data["video"] = items[0] if len(items) == 1 else items
    req = {"prompt": prompt, "multi_modal_data": data}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"otprune_ratio": ratio}
    return req


def record_positions(model) -> None:
    """Every forward of `model` appends its (3, tokens) positions to `model.otprune_positions`
    (ours does so itself; vLLM's own class gets a wrapper)."""
    model.otprune_positions = []
    if not type(model).__name__.startswith("OTPrune"):
        model.otprune_record = None
        original = model.forward

        def forward(input_ids, positions, *args, **kwargs):
            model.otprune_positions.append(positions.detach().cpu().clone())
            return original(input_ids, positions, *args, **kwargs)

        model.forward = forward


def run_alone(llm, name: str):
    """(outputs, prefill positions (3, L), records) of request `name` alone on `llm`."""
    llm.apply_model(lambda m: m.otprune_positions.clear())
    llm.apply_model(lambda m: m.otprune_record.clear() if m.otprune_record is not None else None)
    out = generate(llm, [make_request(name)])[0]
    positions = llm.apply_model(lambda m: m.otprune_positions[0])[0][:, : len(out[0])]
    return out, positions, llm.apply_model(lambda m: list(m.otprune_record or []))[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def runs(request):
    fixture, builtin, model_class = FAMILIES[request.param]
    path = request.getfixturevalue(fixture)
    results: dict = {"family": request.param, "path": path, "model_class": model_class}
    with engine(path, arch=builtin, enable_prefix_caching=False, **OPTIONS) as llm:
        llm.apply_model(record_positions)
        results["builtin"] = {name: run_alone(llm, name) for name in BUILTIN}
    with engine(path, enable_prefix_caching=False, **OPTIONS) as llm:
        assert type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model).__name__.startswith("OTPrune")
        llm.apply_model(lambda m: setattr(m, "otprune_record", []))
        llm.apply_model(record_positions)
        results["plugin"] = {name: run_alone(llm, name) for name in CASES}
        results["batch"] = dict(zip(CASES, generate(llm, [make_request(n) for n in CASES]), strict=True))
    with engine(path, env={"SUBSET_RATIO": "0.25"}, enable_prefix_caching=True, enable_chunked_prefill=True,
                max_num_batched_tokens=8, max_num_seqs=4, block_size=32, **OPTIONS) as llm:  # fmt: skip
        results["chunked"] = [dict(zip(CHUNKED, generate(llm, [make_request(n) for n in CHUNKED]), strict=True))
                              for _ in range(2)]  # fmt: skip
    return results


def test_ratio_1_equals_vllm_builtin_tokens_logprobs_and_positions(runs):
    builtin, plugin = runs["builtin"], runs["plugin"]
    for ours, theirs in (("v", "v"), ("v@1.0", "v"), ("w@1.0", "w@1.0"), ("iv", "iv")):
        assert_same_as_builtin(plugin[ours][0], builtin[theirs][0], (runs["family"], ours))
        assert torch.equal(plugin[ours][1], builtin[theirs][1]), (runs["family"], ours)
        assert plugin[ours][2] == [], ours  # nothing selected


def test_each_video_is_one_token_set_of_k_kept_tokens(runs):
    plugin = runs["plugin"]
    for name, unpruned in PRUNED.items():
        ratio = CASES[name][3]
        records = [rec for rec in plugin[name][2] if rec["modality"] == "video"]
        assert len(records) == len(CASES[name][2]), name  # one set per video, all its frames
        for rec in records:
            grid_t, grid_h, grid_w = rec["item"]["grid"]
            assert rec["total"] == grid_t * grid_h * grid_w // 4 and grid_t >= 2, name  # several frame pairs
            assert rec["keep"] == round(ratio * rec["total"]) == rec["kept"].numel(), name
            assert torch.equal(rec["kept"], otprune.select_tokens(rec["features"], ratio)), name
        removed = sum(r["total"] - r["keep"] for r in plugin[name][2])
        assert len(plugin[name][0][0]) == len(plugin[unpruned][0][0]) - removed, name
    if runs["family"] == "qwen2_5_vl":
        assert plugin["v@0.25"][2][0]["item"]["seconds"] == 2.0  # temporal patch 2 / fps 1: time positions step by 2
    else:
        assert len(plugin["v@0.25"][2][0]["item"]["timestamps"]) == VIDEOS[0][0] // 2


def expected_rows(unpruned: list[int], pads: dict[int, int], records: list[dict]) -> list[int]:
    """The unpruned prompt's index of each pruned prompt row: text (also between a video's frames)
    stays; per set (an image's pads, a video's pads across all its frames: each modality's pads in
    prompt order, T of them per recorded set), the visual slots that stay are those of its kept
    tokens, ascending, and slot j holds the token kept[j]. Every set of the prompt is pruned."""
    remaining = {modality: [i for i, tok in enumerate(unpruned) if tok == pad] for modality, pad in pads.items()}
    keep = {i for i, tok in enumerate(unpruned) if tok not in pads.values()}
    holders = {}
    for rec in records:  # in prompt order within each modality
        members, remaining[rec["modality"]] = (remaining[rec["modality"]][: rec["total"]],
                                               remaining[rec["modality"]][rec["total"]:])  # fmt: skip
        assert len(members) == rec["total"]
        chosen = [members[k] for k in rec["kept"].tolist()]
        keep.update(chosen)
        holders.update(zip(sorted(chosen), chosen, strict=True))
    assert not any(remaining.values()), "a set of the prompt was not recorded"
    return [holders.get(i, i) for i in sorted(keep)]


def test_kept_tokens_have_the_positions_vllm_gives_them_unpruned(runs):
    """Oracle: vLLM's own class's positions on the unpruned prompt (recorded in its forward),
    indexed by the kept tokens' rows; the plugin's prefill positions must equal them."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(runs["path"])
    pads = {"image": config.image_token_id, "video": config.video_token_id}
    plugin, builtin = runs["plugin"], runs["builtin"]
    for name, unpruned_name in PRUNED.items():
        reference = builtin[unpruned_name] if unpruned_name in builtin else plugin[unpruned_name]
        (unpruned, *_), oracle, _ = reference
        (pruned, *_), positions, records = plugin[name]
        rows = expected_rows(unpruned, pads, records)
        assert len(rows) == len(pruned), name
        assert torch.equal(positions, oracle[:, rows]), (runs["family"], name)
        moved = (oracle[:, rows] != torch.arange(len(rows))).any()  # unpruned positions differ from 0..L'-1
        assert moved, name


_HF: dict = {}


def assert_greedy_equal(ours: list[int], theirs: list[int], path: str, label) -> None:
    """vLLM ran with ignore_eos, transformers' generate stops at the end-of-turn token: equal up to there."""
    import transformers

    assert ours[: len(theirs)] == theirs, label
    if len(theirs) < len(ours):
        assert theirs[-1] == transformers.AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<|im_end|>"), label


def hf_pruned(path: str, model_class: str, name: str, positions: torch.Tensor):
    """otprune.hf in this venv on request `name`, given vLLM's unpruned M-RoPE `positions` (3, L) (see
    `test_pruned_prefill_equals_otprune_hf`): (unpruned input ids, pruned length, greedy tokens,
    first-step log-probs)."""
    import transformers

    from otprune import hf

    if path not in _HF:
        _HF[path] = (transformers.AutoProcessor.from_pretrained(path),
                     getattr(transformers, model_class).from_pretrained(path, dtype=torch.float32).eval())  # fmt: skip
    processor, model = _HF[path]
    prompt, images, videos, ratio = CASES[name]
    inputs = hf_inputs(processor, prompt, [image(s, IMAGE_SIZE) for s in images], [video(s, *VIDEOS[s]) for s in videos])
    inputs["position_ids"] = positions[:, None].long()  # (3, 1, L)
    options = dict(max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), hf.pruning(model, otprune.PruneConfig(method="otprune", layer=0, ratio=ratio)) as adapter:
        out = model.generate(**inputs, **options)
        length = adapter.last_stats[0]["seq_len_after"]
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), length, tokens, torch.log_softmax(out.scores[0][0].float(), dim=-1)


def test_pruned_prefill_equals_otprune_hf(runs):
    """otprune.hf in this venv on the same prompt (its processor gives vLLM's unpruned prompt ids):
    the pruned length, the greedy tokens and the first-step log-probs.

    otprune.hf is handed vLLM's unpruned positions (`position_ids`, which it takes from the caller):
    on Qwen2.5-VL, vLLM and transformers 5.x number the text after a video differently (vLLM: one
    past the largest position of the video, its time positions included, as Qwen2.5-VL's original
    code; transformers 5.19 and 5.25's `get_rope_index`: one past max(h, w) / merge from the video's
    start), so unpruned they already differ; the plugin keeps vLLM's numbering."""
    rows = []
    for name, unpruned in PRUNED.items():
        positions = runs["plugin"][unpruned][1]
        ids, length, tokens, first = hf_pruned(runs["path"], runs["model_class"], name, positions)
        (prompt, ours_tokens, ours_first, _), _, _ = runs["plugin"][name]
        assert ids == runs["plugin"][unpruned][0][0], (runs["family"], name)
        assert length == len(prompt), name
        assert_greedy_equal(ours_tokens, tokens, runs["path"], name)
        diff = max(abs(lp - float(first[tok])) for tok, lp in ours_first.items())
        rows.append((name, diff))
        assert diff < 1e-4, (name, diff)
    print(f"{runs['family']} videos, first-step log-prob max |vLLM plugin - otprune.hf|:", rows)


def test_a_batch_of_mixed_ratios_gives_each_requests_own_outputs(runs):
    for name in CASES:
        assert_same(runs["batch"][name], runs["plugin"][name][0], name)


def test_prefix_caching_chunked_prefill_and_mixed_ratios_give_the_same_outputs(runs):
    for round_ in runs["chunked"]:
        for name, ours in round_.items():
            assert_same(ours, runs["plugin"][CHUNKED[name]][0], name)
    assert runs["chunked"][1]["iv"][3] >= 32  # the second round read cached blocks holding kept video tokens


MAIN_VENV_SCRIPT = """
import json, sys
import torch
import transformers
import otprune
from otprune import hf
sys.path.insert(0, sys.argv[1])
from conftest import hf_inputs, image, video
path, model_class, cases = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
processor = transformers.AutoProcessor.from_pretrained(path)
model = getattr(transformers, model_class).from_pretrained(path, dtype=torch.float32).eval()
out = {}
config = model.config
for name, (prompt, images, videos, ratio, ids, positions) in cases.items():
    inputs = hf_inputs(processor, prompt, [image(s, tuple(size)) for s, size in images], [video(s, *shape) for s, shape in videos])
    processor_ids = inputs["input_ids"][0].tolist()
    # vLLM's prompt: transformers 5.25's Qwen3-VL processor lays a video out without vLLM's outer markers
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == config.image_token_id).long() + 2 * (
            inputs["input_ids"] == config.video_token_id).long()
    inputs["position_ids"] = torch.tensor(positions)[:, None]
    with torch.no_grad(), hf.pruning(model, otprune.PruneConfig(method="otprune", layer=0, ratio=ratio)):
        tokens = model.generate(**inputs, max_new_tokens=int(sys.argv[5]), do_sample=False)
    out[name] = [processor_ids, tokens[0, inputs["input_ids"].shape[1]:].tolist()]
print(json.dumps(out))
"""


def test_pruned_tokens_equal_otprune_hf_in_the_main_venv(runs):
    """otprune.hf's greedy tokens on the same checkpoint and frames, run by the project's main venv (its
    transformers 5.25 and torchvision video processor) on vLLM's unpruned prompt ids and positions (see
    `test_pruned_prefill_equals_otprune_hf`); skipped where that venv is absent."""
    import json
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    python = main_venv_python()
    cases = {n: (CASES[n][0], [(s, IMAGE_SIZE) for s in CASES[n][1]], [(s, VIDEOS[s]) for s in CASES[n][2]], CASES[n][3],
                 runs["plugin"][u][0][0], runs["plugin"][u][1].tolist()) for n, u in PRUNED.items()}  # fmt: skip
    env = main_venv_env()
    out = subprocess.run([str(python), "-c", MAIN_VENV_SCRIPT, str(here), runs["path"], runs["model_class"], json.dumps(cases),
                          str(MAX_TOKENS)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, unpruned in PRUNED.items():
        ids, tokens = result[name]
        if runs["family"] == "qwen2_5_vl":  # (Qwen3-VL: transformers 5.25's processor omits vLLM's outer markers)
            assert ids == runs["plugin"][unpruned][0][0], (runs["family"], name)
        assert_greedy_equal(runs["plugin"][name][0][1], tokens, runs["path"], (runs["family"], name))
