"""`otprune bench serve`: vLLM offline throughput and time to first token, unpruned vs pruned.

One engine (the plugin's class for the family's architecture, loaded through the installed entry
point) on a random-weight checkpoint of the family (`SERVE_FAMILIES`, `--family`):
- llava: LLaVA-1.5 geometry written by `otprune.serve.tiny`: a CLIP tower at 336 px / 14 px
  patches (576 tokens per image; a narrow 2-layer tower, the cost of interest is the LLM's), a
  Llama LLM of --width / --intermediate / --layers (default a small one: d = 1024);
- qwen2_5_vl, qwen3_vl, internvl, gemma3: the model `otprune bench prefill` builds
  (`otprune.bench.prefill.parts`: the real LLM sizes of the family's 7B / 8B / 4B model by
  default, --layers of its decoder layers, a tiny vision tower with the real patch grid), saved
  with `save_pretrained`: Qwen2.5-VL 448 px -> 256 tokens, Qwen3-VL 448 px -> 196 tokens,
  InternVL3 1344 x 896 -> 6 tiles of 448 px + the thumbnail = 1792 tokens (pruned as one set),
  Gemma 3 896 px -> 256 tokens (Gemma 3's SigLIP keys and tokenizer adjusted for vLLM's loader,
  `write_gemma3`; on vLLM's CPU backend its image tokens attend causally, pruned or not).
  `--media video` (qwen2_5_vl, qwen3_vl): every request holds one 8-frame video of 448 px frames
  instead (`bench prefill`'s video: 1024 / 784 visual tokens, one token set per video, sent as
  frames + vLLM's metadata at 2 frames a second; Qwen3-VL's timestamps stay in the prompt).
A family whose architecture the plugin does not prune (`otprune.serve.PRUNED`) is refused by name
before anything is written. Unpruned and pruned requests
differ only in their `mm_processor_kwargs` (`otprune_ratio` 1.0 vs --ratio), so both run in the
SAME engine and the ratios come from one run, phases interleaved (unpruned, pruned, unpruned,
pruned, ...). Every request has its own random image (no encoder or prefix cache reuse).

- throughput: --requests requests with --max-tokens new tokens each, in one `LLM.generate` call:
  requests/s;
- TTFT: single requests with 1 new token (prefill only, the whole request's latency is its time
  to first token): median over --ttft-repeats, split into
  - selection: the plugin's `otprune_select` (`otprune.select_tokens` on the projected rows; every
    family's `embed_multimodal` calls it, the M-RoPE families directly, not through `otprune_prune`);
  - LLM prefill: the model's forward over the prompt's embeddings (the decoder layers; the
    multimodal embeddings are computed before it);
  - preprocessing + vision tower: the rest of the request's wall time (vLLM's front end and HF
    image processor, the vision tower and projector, scheduling, sampling), with the vision
    tower + projector alone (vLLM's `embed_multimodal` minus the selection) shown beneath it.
  The timers wrap the model object's methods in the engine's process (the engine runs in this
  process: VLLM_ENABLE_V1_MULTIPROCESSING=0), synchronising CUDA around each call on a GPU.

Beside the measured ratios: the ratio the FLOPs formula (`otprune.flops`, 4nd^2 + 2n^2d + 2ndm
per layer) predicts for one prefill of the same token counts and LLM sizes. The formula counts the
LLM's decoder layers only: not the vision tower (it runs on all T tokens, pruned or not),
preprocessing or scheduling; compare it with the LLM-prefill part, not with the whole TTFT.
Runs in the serve venv (vLLM); imports vLLM only inside `run`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

PROMPT = "USER: <image>\nDescribe the picture in detail. ASSISTANT:"


@dataclasses.dataclass(frozen=True)
class ServeFamily:
    """One family of `otprune bench serve --family`.

    Attributes:
        name: the `--family` name (a family of `otprune.hf.FAMILIES`).
        architecture: vLLM's architecture name; benchmarked only while the plugin prunes it
            (`otprune.serve.PRUNED`).
        writer: "module:function" writing the checkpoint: `write(folder, family, size, layers, media)` ->
            (its path, the request's prompt with one `media` ("image" / "video") placeholder).
        image: (width, height) of every request's random image.
        visual_tokens: the visual tokens of one such image.
        geometry: what the checkpoint's vision side is, for the table's header.
        small: the default LLM when not the real one (llava: d, m, heads), or None = the real
            sizes of `otprune.bench.prefill.llm_size(family)`.
        layers: default decoder layers.
        note: a line printed under the table's header ("" = none), e.g. what vLLM computes differently.
        video: (frames, width, height) of every request's random video with `--media video`, or None
            (images only); `otprune bench prefill`'s video input.
        video_tokens: the visual tokens of one such video (all its frames: one token set).
    """

    name: str
    architecture: str
    writer: str
    image: tuple[int, int]
    visual_tokens: int
    geometry: str
    small: tuple[int, int, int] | None = None
    layers: int = 2
    note: str = ""
    video: tuple[int, int, int] | None = None
    video_tokens: int = 0


# A new family is one entry (the plugin must prune its architecture).
SERVE_FAMILIES: dict[str, ServeFamily] = {
    family.name: family
    for family in (
        ServeFamily("llava", "LlavaForConditionalGeneration", "otprune.bench.serve:write_llava", (640, 480), 576,
                    "LLaVA-1.5 geometry: 336 px CLIP", small=(1024, 2816, 16), layers=4),
        ServeFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "otprune.bench.serve:write_from_prefill",
                    (448, 448), 256, "Qwen2.5-VL geometry: 448 px image, 14 px patches, 2 x 2 merge",
                    video=(8, 448, 448), video_tokens=4 * 256),  # temporal patch 2: 4 x 256
        ServeFamily("qwen3_vl", "Qwen3VLForConditionalGeneration", "otprune.bench.serve:write_from_prefill",
                    (448, 448), 196, "Qwen3-VL geometry: 448 px image, 16 px patches, 2 x 2 merge, DeepStack",
                    video=(8, 448, 448), video_tokens=4 * 196),  # 4 temporal steps, each with a text timestamp
        ServeFamily("internvl", "InternVLForConditionalGeneration", "otprune.bench.serve:write_from_prefill",
                    (1344, 896), 1792, "InternVL geometry: 448 px tiles, 6 + thumbnail, 256 tokens each"),
        ServeFamily("gemma3", "Gemma3ForConditionalGeneration", "otprune.bench.serve:write_gemma3",
                    (896, 896), 256, "Gemma 3 geometry: 896 px SigLIP, 14 px patches, pooled 4 x 4",
                    note="vLLM's CPU backend has no bidirectional image block: image tokens attend causally, "
                         "pruned and unpruned alike (the plugin warns at start)"),
    )
}  # fmt: skip


def serve_family(name: str) -> ServeFamily:
    """The entry of `--family` name; ValueError naming the families the plugin prunes when it does
    not prune this one (checked against `otprune.serve.PRUNED`, the plugin's registry)."""
    from otprune.serve import PRUNED

    pruned = [f.name for f in SERVE_FAMILIES.values() if f.architecture in PRUNED]
    found = SERVE_FAMILIES.get(name)
    if found is None:
        raise ValueError(f"--family={name!r}: must be one of {', '.join(pruned)} (the families the vLLM plugin prunes)")
    if found.architecture not in PRUNED:
        raise ValueError(f"--family={name!r}: the vLLM plugin does not prune {found.architecture} (otprune.serve.PRUNED); "
                         f"this benchmark runs {', '.join(pruned)}")  # fmt: skip
    return found


def serve_size(family: ServeFamily, width=None, intermediate=None, heads=None, kv_heads=None):
    """The LLM sizes (`otprune.bench.prefill.LLMSize`): the family's default (llava: a small LLM; the
    others: the real model's), overridden by the flags; vLLM's CPU attention needs head size >= 32."""
    from otprune.bench import prefill

    if family.small is not None:
        d, m, h = family.small
        width, intermediate, heads = width or d, intermediate or m, heads or h
        if kv_heads is not None and kv_heads != max(1, heads // 2):
            raise ValueError(f"--kv-heads={kv_heads}: the {family.name} checkpoint has half the heads as KV heads "
                             f"({max(1, heads // 2)} for --heads {heads}); leave it unset")  # fmt: skip
        kv_heads = max(1, heads // 2)  # `otprune.serve.tiny`'s LLaMA: half the heads
        if width % heads:
            raise ValueError(f"--width {width} / --heads {heads}: head size must be an integer >= 32 (vLLM CPU)")
        size = prefill.LLMSize(width, intermediate, heads, kv_heads)
    else:
        size = prefill.llm_size(family.name, width, intermediate, heads, kv_heads)
    if size.head_dim < 32:
        raise ValueError(f"--width {size.hidden} / --heads {size.heads}: head size {size.head_dim} must be >= 32 (vLLM CPU)")
    return size


def write_llava(folder, family: str, size, layers: int, media: str = "image"):
    """`otprune.serve.tiny.write_tiny_llava` at 336 px (576 tokens per image) with the LLM of `size`; images only."""
    from otprune.serve.tiny import write_tiny_llava

    path = write_tiny_llava(folder, image_size=336, hidden_size=size.hidden, layers=layers, heads=size.heads,
                            intermediate_size=size.intermediate)  # fmt: skip
    return path, PROMPT


def write_from_prefill(folder, family: str, size, layers: int, media: str = "image"):
    """The model `otprune bench prefill` builds for `family` (real LLM sizes, tiny tower, real patch
    grid), random weights, saved with its image (and, `media="video"`, video) processor, tokenizer and
    a generation config; the prompt for one `media`."""
    from pathlib import Path

    from transformers import GenerationConfig

    from otprune.bench import prefill

    part = prefill.parts(family, size, layers, videos=media == "video")
    model = prefill.random_model(family, part.config)
    folder = Path(folder)
    model.save_pretrained(folder)
    del model
    part.processor.save_pretrained(folder)
    text = part.config.get_text_config()
    GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id).save_pretrained(folder)
    return folder, part.video_prompt if media == "video" else part.image_prompt


def write_gemma3(folder, family: str, size, layers: int, media: str = "image"):
    """`write_from_prefill`'s Gemma 3, then made loadable by vLLM (`otprune.serve.tiny.gemma3_for_vllm`:
    the SigLIP keys' layout, the newline tokens vLLM's Gemma 3 processor looks up)."""
    from otprune.serve.tiny import gemma3_for_vllm

    path, prompt = write_from_prefill(folder, family, size, layers, media)
    gemma3_for_vllm(path)
    return path, prompt


@dataclasses.dataclass
class ServeResult:
    visual_tokens: int
    kept_tokens: int
    prompt_tokens: int
    pruned_prompt_tokens: int
    throughput: dict  # ratio label -> [requests/s per round]
    ttft_ms: dict  # ratio label -> [ms per request]
    ttft_parts: dict  # ratio label -> {part: [ms per request]}: "tower", "select", "prefill" (measured)
    flops_ratio: float
    start_s: float
    width: int
    intermediate: int
    layers: int
    requests: int
    max_tokens: int
    ratio: float
    family: str = "llava"
    media: str = "image"  # what every request holds: one "image" or one "video"
    size_label: str = ""  # e.g. "Qwen2.5-VL-7B sizes: d=3584, m=18944, 28 heads (4 KV)"; "" = d, m only


def _image(seed: int, size: tuple[int, int] = (640, 480)):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


VIDEO_FPS = 2.0  # as `otprune bench prefill`'s Qwen3-VL video: 2 frames a second, not resampled


def _video(seed: int, shape: tuple[int, int, int]):
    """(frames (T, H, W, 3) uint8, vLLM's video metadata) of a random video of `shape` = (frames,
    width, height) at `VIDEO_FPS`, every frame used (vLLM 0.32 needs the metadata for Qwen videos)."""
    import numpy as np

    frames, width, height = shape
    array = np.random.RandomState(seed).randint(0, 255, (frames, height, width, 3), dtype=np.uint8)
    metadata = {"fps": VIDEO_FPS, "duration": frames / VIDEO_FPS, "total_num_frames": frames,
                "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}  # fmt: skip
    return array, metadata


def serve_media(entry: ServeFamily, media: str) -> tuple[int, str]:
    """(visual tokens per request, what the table's header says) of `media` ("image" / "video") for
    `entry`; ValueError naming the flag when the family has no such input here."""
    if media == "image":
        return entry.visual_tokens, "per image"
    if media == "video" and entry.video is not None:
        frames, width, height = entry.video
        return entry.video_tokens, f"per {frames}-frame video of {width} x {height} frames (one token set)"
    videos = [name for name, f in SERVE_FAMILIES.items() if f.video is not None]
    raise ValueError(f"--media={media!r}: family {entry.name!r} takes images only here "
                     f"(--media video: {', '.join(videos)})" if media == "video" else
                     f"--media={media!r}: must be image or video")  # fmt: skip


PARTS = ("tower", "select", "prefill")  # measured per request: vision tower + projector, selection, LLM forward


def _install_timers(model) -> None:
    """Wrap the model's `embed_multimodal` (tower + projector + selection), `otprune_select` (selection)
    and `forward` (the LLM over the prompt) with wall-clock timers adding to `model.otprune_timings` (ms)."""
    import torch

    timings = {"embed": 0.0, "select": 0.0, "prefill": 0.0}

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def timed(name: str, method):
        def wrapper(*args, **kwargs):
            sync()
            tic = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                sync()
                timings[name] += (time.perf_counter() - tic) * 1000.0

        return wrapper

    model.embed_multimodal = timed("embed", model.embed_multimodal)
    model.otprune_select = timed("select", model.otprune_select)
    model.forward = timed("prefill", model.forward)
    model.otprune_timings = timings


def _take_timings(model) -> dict:
    """{"tower", "select", "prefill"} ms since the last call (the timers reset)."""
    timings = model.otprune_timings
    out = {"tower": timings["embed"] - timings["select"], "select": timings["select"], "prefill": timings["prefill"]}
    for key in timings:
        timings[key] = 0.0
    return out


def run(
    *, family: str = "llava", size=None, layers: int, ratio: float, requests: int, max_tokens: int, rounds: int,
    ttft_repeats: int, progress: Callable[[str], None], engine_options: dict | None = None, media: str = "image",
) -> ServeResult:  # fmt: skip
    """One engine on `family`'s random checkpoint with the LLM of `size` (`serve_size`, default the
    family's) and `layers` decoder layers: throughput and TTFT, unpruned vs pruned at `ratio`, every
    request with one `media` ("image", or "video": the family's `video`).
    `engine_options`: extra `vllm.LLM` arguments (tests: `enforce_eager=True`)."""
    entry = serve_family(family)  # refuses a family the plugin does not prune, before anything is written
    visual, _ = serve_media(entry, media)
    size = size or serve_size(entry)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: the timers read the model
    for name in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO"):  # both phases' ratios come per request
        os.environ.pop(name, None)
    from vllm import LLM, SamplingParams

    from otprune.bench.prefill import predicted_ratio
    from otprune.hf.families import load_object

    with tempfile.TemporaryDirectory(prefix="otprune-bench-serve-") as folder:
        progress(f"writing a random {entry.geometry} checkpoint (LLM {size.label()}, {layers} layers)")
        path, text = load_object(entry.writer)(folder, entry.name, size, layers, media)
        progress("starting the vLLM engine")
        start = time.perf_counter()
        limits = {"image": 1} if entry.name == "llava" else {"image": 1, "video": 0}
        if media == "video":
            limits = {"image": 0, "video": 1}
        options = dict(dtype="float32", max_model_len=4096, seed=0, enable_prefix_caching=False, mm_processor_cache_gb=0,
                       limit_mm_per_prompt=limits)  # fmt: skip
        llm = LLM(model=str(path), **{**options, **(engine_options or {})})
        start_s = time.perf_counter() - start
        try:
            seed = iter(range(10**6))

            def batch(count: int, value: float) -> list[dict]:
                def item(index: int):
                    return _video(index, entry.video) if media == "video" else _image(index, entry.image)

                return [{"prompt": text, "multi_modal_data": {media: item(next(seed))},
                         "mm_processor_kwargs": {"otprune_ratio": value}} for _ in range(count)]  # fmt: skip

            labels = {"unpruned": 1.0, "pruned": ratio}
            gen = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            first = SamplingParams(max_tokens=1, temperature=0.0)
            lengths = {}
            progress("warm-up")
            for label, value in labels.items():
                out = llm.generate(batch(2, value), gen, use_tqdm=False)
                lengths[label] = len(out[0].prompt_token_ids)
            throughput = {label: [] for label in labels}
            ttft = {label: [] for label in labels}
            parts = {label: {part: [] for part in PARTS} for label in labels}
            llm.apply_model(_install_timers)
            for index in range(rounds):
                for label, value in labels.items():
                    reqs = batch(requests, value)
                    tic = time.perf_counter()
                    llm.generate(reqs, gen, use_tqdm=False)
                    throughput[label].append(requests / (time.perf_counter() - tic))
                    progress(f"round {index + 1}/{rounds} {label}: {throughput[label][-1]:.2f} requests/s")
            for _ in range(ttft_repeats):
                for label, value in labels.items():
                    req = batch(1, value)
                    llm.apply_model(_take_timings)  # reset
                    tic = time.perf_counter()
                    llm.generate(req, first, use_tqdm=False)
                    ttft[label].append((time.perf_counter() - tic) * 1000.0)
                    (measured,) = llm.apply_model(_take_timings)
                    for part in PARTS:
                        parts[label][part].append(measured[part])
        finally:
            llm.llm_engine.engine_core.shutdown()
    kept = visual - (lengths["unpruned"] - lengths["pruned"])
    what = f"{size.name} sizes: " if size.name else ""
    return ServeResult(
        visual_tokens=visual, kept_tokens=kept, prompt_tokens=lengths["unpruned"], pruned_prompt_tokens=lengths["pruned"],
        throughput=throughput, ttft_ms=ttft, ttft_parts=parts, start_s=start_s, width=size.hidden,
        flops_ratio=predicted_ratio(lengths["unpruned"], lengths["pruned"], layers, size.hidden, size.intermediate),
        intermediate=size.intermediate, layers=layers, requests=requests, max_tokens=max_tokens, ratio=ratio,
        family=entry.name, media=media, size_label=what + size.label(),
    )  # fmt: skip


def ttft_split(result: ServeResult) -> dict:
    """label -> {"total", "rest", "tower", "select", "prefill"}: medians over the TTFT requests (ms);
    "rest" = preprocessing + vision tower = total - selection - LLM prefill, per request."""
    out = {}
    for label, totals in result.ttft_ms.items():
        parts = result.ttft_parts[label]
        rest = [total - select - prefill for total, select, prefill in zip(totals, parts["select"], parts["prefill"], strict=True)]
        out[label] = {"total": statistics.median(totals), "rest": statistics.median(rest)}
        out[label].update({part: statistics.median(values) for part, values in parts.items()})
    return out


def format_table(result: ServeResult) -> str:
    tput = {k: statistics.median(v) for k, v in result.throughput.items()}
    split = ttft_split(result)
    ttft = {k: v["total"] for k, v in split.items()}
    r = result
    _, per_item = serve_media(SERVE_FAMILIES[r.family], r.media)

    def row(name: str, part: str, flops: str) -> str:
        full, pruned = split["unpruned"][part], split["pruned"][part]
        ratio = f"{pruned / full:.3f}" if full > 0 and part != "select" else "-"  # unpruned: nothing selected
        return f"| {name} | {full:.0f} | {pruned:.0f} | {ratio} | {flops} |"

    lines = [
        f"vLLM offline, one engine, OTPrune r = {r.ratio} per request (mm_processor_kwargs otprune_ratio) vs unpruned;",
        f"{SERVE_FAMILIES[r.family].geometry} -> {r.visual_tokens} visual tokens {per_item}, kept {r.kept_tokens}; "
        f"prompt {r.prompt_tokens} -> {r.pruned_prompt_tokens} tokens; random LLM "
        f"{r.size_label or f'd={r.width}, m={r.intermediate}'}, {r.layers} layers, fp32; engine start {r.start_s:.0f} s",
        *([SERVE_FAMILIES[r.family].note] if SERVE_FAMILIES[r.family].note else []),
        "",
        "| measure | unpruned | pruned | pruned / unpruned | FLOPs-predicted (prefill) |",
        "|---|---|---|---|---|",
        f"| throughput ({r.requests} requests x {r.max_tokens} new tokens), requests/s | {tput['unpruned']:.2f} | "
        f"{tput['pruned']:.2f} | {tput['unpruned'] / tput['pruned']:.3f} (time) | {r.flops_ratio:.3f} |",
        f"| time to first token (1 request, 1 token), ms | {ttft['unpruned']:.0f} | {ttft['pruned']:.0f} | "
        f"{ttft['pruned'] / ttft['unpruned']:.3f} | (the formula counts the LLM only) |",
        row("- preprocessing + vision tower, ms", "rest", "not counted (the tower runs on all tokens)"),
        row("  of which vision tower + projector, ms", "tower", "not counted"),
        row("- selection, ms", "select", "not counted"),
        row("- LLM prefill, ms", "prefill", f"{r.flops_ratio:.3f}"),
        "",
        f"medians over {len(r.throughput['unpruned'])} throughput round(s) and {len(r.ttft_ms['unpruned'])} TTFT "
        "request(s) per phase, phases interleaved; pruned / unpruned for throughput is the time ratio "
        "(unpruned requests/s over pruned requests/s). TTFT parts: selection and LLM prefill timed around the "
        "model's methods; preprocessing + vision tower = the rest of the request (HF processor, tower, scheduling, "
        "sampling). The FLOPs formula counts the LLM's decoder layers only: compare it with the LLM prefill.",
    ]
    return "\n".join(lines)


def main(args) -> int:
    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    for flag in ("width", "intermediate", "layers", "heads", "kv_heads", "requests", "max_tokens", "rounds", "ttft_repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value}: must be an integer >= 1")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"--ratio={args.ratio}: must be in (0, 1], e.g. 0.098")
    entry = serve_family(args.family)
    serve_media(entry, args.media)
    size = serve_size(entry, args.width, args.intermediate, args.heads, args.kv_heads)
    result = run(
        family=entry.name, size=size, layers=args.layers or entry.layers, ratio=args.ratio, requests=args.requests,
        max_tokens=args.max_tokens, rounds=args.rounds, ttft_repeats=args.ttft_repeats, progress=progress,
        media=args.media,
    )  # fmt: skip
    print(format_table(result))
    return 0
