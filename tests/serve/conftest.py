"""Fixtures of the vLLM plugin tests: they run in the serve venv (`make test-serve`) and are skipped
in the main venv, which has no vLLM.

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a test reaches the model with
`LLM.apply_model`; the plugin is loaded through its installed entry point, as `vllm serve` loads
it. Every engine is module- or session-scoped and shut down explicitly: one costs ~30 s to start
on 2 cores. The engines run with the pruning switches unset (requests carry their ratio in
`mm_processor_kwargs`) except where a test sets them for its own engine's lifetime.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
SKIP_REASON = "the vLLM plugin tests run in the serve venv (make test-serve)"
SWITCHES = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER", "FITPRUNE_RECIPE",
            "CDPRUNER_CLIP", "CDPRUNER_THETA")
if HAVE_VLLM:  # only in the serve venv: the main suite's environment is left alone
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for _name in SWITCHES:  # engines start unpruned unless a test says otherwise
        os.environ.pop(_name, None)

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
PROMPT2 = "USER: <image>\nand <image>\nCompare them. ASSISTANT:"
MAX_TOKENS = 6


def image(seed: int, size=(160, 120)):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def video(seed: int, frames: int, height: int, width: int, fps: float = 1.0):
    """(frames (T, H, W, 3) uint8, vLLM's video metadata): a random video of `frames` frames at `fps`, not resampled."""
    import numpy as np

    array = np.random.RandomState(1000 + seed).randint(0, 255, (frames, height, width, 3), dtype=np.uint8)
    metadata = {"fps": fps, "duration": frames / fps, "total_num_frames": frames, "frames_indices": list(range(frames)),
                "video_backend": "opencv", "do_sample_frames": False}  # fmt: skip
    return array, metadata


def main_venv_python():
    """The project's main venv's python (`OTPRUNE_MAIN_PYTHON`, else the repository's .venv), for tests that
    compare with otprune.hf under its transformers; skips the test where it is absent or is not that venv."""
    import subprocess
    from pathlib import Path

    python = Path(os.environ.get("OTPRUNE_MAIN_PYTHON", Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"))
    if not python.exists():
        pytest.skip(f"no main venv at {python} (set OTPRUNE_MAIN_PYTHON)")
    probe = subprocess.run([str(python), "-c", "import pytest, transformers, vllm"], capture_output=True, text=True)
    if "No module named 'vllm'" not in probe.stderr:
        pytest.skip(f"{python} is not the main venv (it has vLLM, or lacks transformers/pytest)")
    return python


def main_venv_env() -> dict:
    """The environment for a main-venv subprocess: one thread, and no PYTHONPATH entry that holds a
    `transformers` package (e.g. a patched copy of the serve venv's): the main venv's own is used."""
    from pathlib import Path

    path = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                           if p and not (Path(p) / "transformers").is_dir())  # fmt: skip
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def hf_inputs(processor, prompt: str, images: list, videos: list):
    """transformers' processor on a prompt with images and `video` items (frames, metadata), frames not resampled."""
    from transformers.video_utils import VideoMetadata

    kwargs: dict = {"images": images} if images else {}
    if videos:
        kwargs["videos"] = [frames for frames, _ in videos]
        kwargs["video_metadata"] = [VideoMetadata(**{k: meta[k] for k in ("fps", "duration", "total_num_frames",
                                                                           "frames_indices")}) for _, meta in videos]  # fmt: skip
        kwargs["do_sample_frames"] = False
    return processor(text=prompt, return_tensors="pt", **kwargs)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_llava

    return str(write_tiny_llava(tmp_path_factory.mktemp("vllm-llava") / "ckpt", seed=0))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_qwen2_5_vl

    return str(write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vllm-qwen2_5_vl") / "ckpt"))


@pytest.fixture(scope="session")
def tiny_onevision(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_onevision

    return str(write_tiny_onevision(tmp_path_factory.mktemp("vllm-onevision") / "ckpt"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_qwen3_vl

    return str(write_tiny_qwen3_vl(tmp_path_factory.mktemp("vllm-qwen3_vl") / "ckpt"))


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_internvl

    return str(write_tiny_internvl(tmp_path_factory.mktemp("vllm-internvl") / "ckpt"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_gemma3

    return str(write_tiny_gemma3(tmp_path_factory.mktemp("vllm-gemma3") / "ckpt"))


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory):
    from otprune.serve.tiny import write_tiny_llava_next

    return str(write_tiny_llava_next(tmp_path_factory.mktemp("vllm-llava-next") / "ckpt", seed=0))


@contextlib.contextmanager
def engine(model: str, *, arch: str | None = None, env: dict | None = None, **kwargs):
    """A vLLM engine on `model` (fp32, eager, CPU), with `env` set for its whole lifetime."""
    from vllm import LLM

    saved = {name: os.environ.get(name) for name in (env or {})}
    os.environ.update(env or {})
    options = dict(dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, limit_mm_per_prompt={"image": 2})
    if arch is not None:
        options["hf_overrides"] = {"architectures": [arch]}
    options.update(kwargs)
    llm = None
    try:  # the environment is restored also when the engine refuses to start
        llm = LLM(model=model, **options)
        yield llm
    finally:
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sized_images(sizes: dict, seeds) -> list:
    """The test images of `seeds`, each at its size `sizes[seed]` = (width, height)."""
    return [image(seed, sizes[seed]) for seed in seeds]


def family_runs(model: str, builtin: str, cases: dict, sizes: dict, ratio: float, chunk: int, **options) -> dict:
    """The engines of a family's exactness test, one after another, on checkpoint `model`:

    - "builtin": vLLM's own class (architecture alias `builtin`), requests "one" and "two";
    - "plugin" / "records": ours without switches, each case alone (its ratio per request), with the
      kept indices the model recorded; "batch": all cases in one batch;
    - "chunked": ours with SUBSET_RATIO=`ratio`, prefix caching, `chunk`-token prefill chunks, the
      cases without a per-request ratio and those at 1.0, 0.5 and the other image at `ratio`, twice.

    `cases`: `ratio_cases`; `sizes`: the images' sizes (`sized_images`); `options` go to every engine."""

    def make_request(name):
        prompt, seeds, ratio_ = cases[name]
        return request(prompt, sized_images(sizes, seeds), ratio_)

    results: dict = {}
    with engine(model, arch=builtin, enable_prefix_caching=False, **options) as llm:
        names = ["one", "two"]
        results["builtin"] = dict(zip(names, generate(llm, [make_request(n) for n in names]), strict=True))
    with engine(model, enable_prefix_caching=False, **options) as llm:
        assert type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model).__name__.startswith("OTPrune")
        llm.apply_model(lambda m: setattr(m, "otprune_record", []))
        plugin, records = {}, {}
        for name in cases:  # one at a time, so each request's records are its own
            plugin[name] = generate(llm, [make_request(name)])[0]
            records[name] = llm.apply_model(lambda m: list(m.otprune_record))[0]
            llm.apply_model(lambda m: m.otprune_record.clear())
        results["plugin"], results["records"] = plugin, records
        results["batch"] = dict(zip(cases, generate(llm, [make_request(n) for n in cases]), strict=True))
    chunked = [name for name in cases if cases[name][2] in (None, 1.0, 0.5) or not name.startswith(("one", "two"))]
    with engine(
        model, env={"SUBSET_RATIO": str(ratio)}, enable_prefix_caching=True, enable_chunked_prefill=True,
        max_num_batched_tokens=chunk, max_num_seqs=4, block_size=32, **options,
    ) as llm:  # fmt: skip
        results["chunked"] = [dict(zip(chunked, generate(llm, [make_request(n) for n in chunked]), strict=True))
                              for _ in range(2)]  # fmt: skip
    return results


def ratio_cases(prompt: str, prompt2: str, ratio: float, other: str = "other") -> dict:
    """The requests every family's exactness test runs: name -> (prompt, image seeds, per-request ratio)."""
    return {
        "one": (prompt, [0], None),
        "one@1.0": (prompt, [0], 1.0),
        "one@0.5": (prompt, [0], 0.5),
        f"one@{ratio}": (prompt, [0], ratio),
        f"{other}@{ratio}": (prompt, [1], ratio),
        f"two@{ratio}": (prompt2, [2, 3], ratio),
        "two": (prompt2, [2, 3], None),
    }


def hf_reference(path: str, model_class: str, prompt: str, images: list, ratio: float | None, method: str = "otprune",
                 clip: str | None = None, edit=None):
    """(prompt length after pruning, greedy tokens, first-step log-probs) from `otprune.hf` on
    transformers' `model_class` loaded from `path` (fp32), pruned by `method`; unpruned at ratio None or 1.
    `clip`: the CLIP checkpoint of CDPruner's text side (`method="cdpruner"`). `edit`: a function applied
    to the processor's output first (e.g. Gemma 3's `token_type_ids` zeroed)."""
    import torch
    import transformers

    import otprune
    from otprune import hf

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, model_class).from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    if edit is not None:
        inputs = edit(inputs)
    # eos_token_id=None: all MAX_TOKENS tokens, as vLLM's `ignore_eos=True` in `generate`
    options = dict(max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   eos_token_id=None)  # fmt: skip
    with torch.no_grad():
        if ratio is None or ratio == 1.0:
            out = model.generate(**inputs, **options)
            length = inputs["input_ids"].shape[1]
        else:
            with hf.pruning(model, otprune.PruneConfig(method=method, layer=0, ratio=ratio)) as adapter:
                adapter.clip_checkpoint = clip
                out = model.generate(**inputs, **options)
                length = adapter.last_stats[0]["seq_len_after"]
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return length, tokens, torch.log_softmax(out.scores[0][0].float(), dim=-1)


def mrope_reference(path: str, model_class: str, prompt: str, images: list, ratio: float | None, compact: bool = False):
    """An explicit reference for an M-RoPE model (Qwen2.5-VL, Qwen3-VL) from transformers' public
    pieces, without otprune.hf and without a KV cache: the tower's merged tokens per image,
    `select_tokens` on them, the unpruned prompt's M-RoPE positions (`get_rope_index`) at the kept
    rows (Qwen3-VL: the DeepStack features at the same kept rows), then the language model on the
    whole sequence at every greedy step, each new token one past the last position.
    `compact`: the negative control, positions 0..L'-1 on all three rows instead (what a pruned
    sequence gets without position handling). Returns (prompt length after pruning, greedy tokens,
    first-step log-probs)."""
    import torch
    import transformers

    import otprune

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, model_class).from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    ids, grids = inputs["input_ids"], inputs["image_grid_thw"]
    image_id = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], grids)
        features = torch.cat(list(getattr(encoded, "pooler_output", encoded)))  # (sum T, D)
        deepstack = [torch.cat(list(planes)) for planes in getattr(encoded, "deepstack_features", None) or []]
        types = inputs.get("mm_token_type_ids", (ids == image_id).int())
        rope = model.model.get_rope_index
        extra = {"mm_token_type_ids": types} if "mm_token_type_ids" in rope.__code__.co_varnames else {}
        positions, _ = rope(ids, image_grid_thw=grids, attention_mask=inputs["attention_mask"], **extra)  # (3, 1, L)
        embeds = model.get_input_embeddings()(ids)[0]
        slots = (ids[0] == image_id).nonzero().squeeze(1)
        embeds[slots] = features
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        kept_rows = torch.arange(slots.numel())
        if ratio is not None and ratio < 1.0:
            keep[slots] = False
            kept, start = [], 0
            for total in (grids.prod(-1) // merge**2).tolist():
                kept.append(start + otprune.select_tokens(features[start:start + total], ratio))
                start += total
            kept_rows = torch.cat(kept)
            keep[slots[kept_rows]] = True
        embeds, positions = embeds[keep], positions[:, 0, keep]
        if compact:
            positions = torch.arange(positions.shape[1]).expand(3, -1)
        visual = (ids[0] == image_id)[keep]
        deepstack = [plane[kept_rows] for plane in deepstack]
        tokens, first = [], None
        for _ in range(MAX_TOKENS):
            options = {"visual_pos_masks": visual[None], "deepstack_visual_embeds": deepstack} if deepstack else {}
            hidden = model.model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None],
                                                **options).last_hidden_state  # fmt: skip
            logits = model.lm_head(hidden[0, -1]).float()
            first = torch.log_softmax(logits, dim=-1) if first is None else first
            tokens.append(int(logits.argmax()))
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor(tokens[-1:]))])
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            visual = torch.cat([visual, torch.zeros(1, dtype=torch.bool)])
    return int(keep.sum()), tokens, first


def assert_matches(plugin: dict, names, reference, label: str, all_tokens: bool = True) -> list:
    """Each request `name` of `plugin` (outputs of `generate`) has the prompt length, the greedy tokens
    (only the first when `all_tokens` is False) and, within 1e-4, the first-step log-probs of
    `reference(name)` -> (length, tokens, log-probs over the vocabulary); prints the max |diff| per request."""
    rows = []
    for name in names:
        length, tokens, first = reference(name)
        ours_prompt, ours_tokens, ours_first, _ = plugin[name]
        assert len(ours_prompt) == length, name
        assert (ours_tokens if all_tokens else ours_tokens[:1]) == (tokens if all_tokens else tokens[:1]), name
        diff = max(abs(lp - float(first[tok])) for tok, lp in ours_first.items())
        rows.append((name, diff))
        assert diff < 1e-4, (name, diff)
    print(f"first-step log-prob max |vLLM plugin - {label}|:", rows)
    return rows


def assert_same(ours, reference, name, tol: float = 1e-4) -> None:
    """Two `generate` outputs of one request: the same prompt and tokens, first-step log-probs within `tol`."""
    assert ours[0] == reference[0], name
    assert ours[1] == reference[1], name
    for tok, lp in ours[2].items():
        assert math.isclose(lp, reference[2][tok], abs_tol=tol), (name, tok, lp, reference[2][tok])


def assert_same_as_builtin(ours, builtin, name) -> None:
    """One request through our class at ratio 1 and through vLLM's: the same prompt (T placeholders per
    image) and greedy tokens, exactly; the first-step top-5 log-probs within 1e-5 (the same computation,
    but other batches or engines may take another BLAS path: never compared bit for bit)."""
    assert ours[0] == builtin[0], name
    assert ours[1] == builtin[1], name
    shared = set(ours[2]) & set(builtin[2])
    assert len(shared) >= 4, (name, ours[2], builtin[2])  # a near-tie may swap the 5th
    for tok in shared:
        assert math.isclose(ours[2][tok], builtin[2][tok], abs_tol=1e-5), (name, tok, ours[2][tok], builtin[2][tok])


def assert_ratio_1_equals_builtin(runs: dict) -> None:
    """`family_runs`: ours at ratio 1 (no switch, and `otprune_ratio=1.0`) gives vLLM's class's prompt and
    tokens, and its first-step top-5 log-probs within 1e-5 (`assert_same_as_builtin`), one and two images."""
    builtin, plugin = runs["builtin"], runs["plugin"]
    for ours in ("one", "one@1.0"):
        assert_same_as_builtin(plugin[ours], builtin["one"], ours)
    assert_same_as_builtin(plugin["two"], builtin["two"], "two")


def assert_kept_indices(runs: dict, cases: dict, ratio: float) -> list:
    """`family_runs`: nothing selected at ratio 1; pruned, each image keeps round(r * T) rows, the indices
    `otprune.select_tokens` gives on the rows the model saw, and the prompt is shorter by the dropped
    rows. Returns the records of "two@`ratio`" (one per image) for family-specific checks."""
    import torch

    import otprune

    records, plugin = runs["records"], runs["plugin"]
    assert records["one"] == [] and records["one@1.0"] == []
    for name, full in (("one@0.5", "one"), (f"one@{ratio}", "one"), (f"two@{ratio}", "two")):
        ratio_ = cases[name][2]
        removed = sum(rec["total"] - rec["keep"] for rec in records[name])
        assert len(plugin[name][0]) == len(plugin[full][0]) - removed, name
        for rec in records[name]:
            assert rec["keep"] == round(ratio_ * rec["total"])
            assert torch.equal(rec["kept"], otprune.select_tokens(rec["features"], ratio_)), name
    return records[f"two@{ratio}"]


def assert_rounds_same(rounds: list, plugin: dict, ratio: float, min_cached: int) -> None:
    """Each round of an engine with SUBSET_RATIO=`ratio` (chunked prefill, prefix caching, mixed
    per-request ratios) gives every request the outputs the unpruned-default engine gave it at the
    same ratio; the second round read the prefix cache beyond `min_cached` tokens for "two"."""
    defaults = {"one": f"one@{ratio}", "two": f"two@{ratio}"}
    for round_ in rounds:
        for name, ours in round_.items():
            assert_same(ours, plugin[defaults.get(name, name)], name)
    assert rounds[1]["two"][3] >= min_cached  # blocks holding the first image's kept tokens


def request(prompt: str, images: list, ratio: float | None = None) -> dict:
    req = {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"otprune_ratio": ratio}
    return req


def generate(llm, requests: list[dict], max_tokens: int = MAX_TOKENS, logprobs: int = 5):
    """[(prompt token ids, generated ids, first-step {token: logprob}, cached prompt tokens)] per request."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True)
    outs = llm.generate(requests, params, use_tqdm=False)
    result = []
    for out in outs:
        completion = out.outputs[0]
        first = {tok: lp.logprob for tok, lp in completion.logprobs[0].items()}
        result.append((list(out.prompt_token_ids), list(completion.token_ids), first, out.num_cached_tokens or 0))
    return result


@pytest.fixture(scope="module")
def plugin_llm(tiny_llava):
    """The plugin's LLaVA-1.5 (the entry point registers it under vLLM's architecture name), unpruned engine."""
    with engine(tiny_llava, enable_prefix_caching=False) as llm:
        yield llm
