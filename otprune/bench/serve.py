"""`otprune bench serve`: vLLM offline throughput and time to first token, unpruned vs pruned.

One engine (the plugin's LLaVA-1.5 class, loaded through the installed entry point) on a
random-weight LLaVA-1.5-geometry checkpoint written by `otprune.serve.tiny`: a CLIP tower at
336 px / 14 px patches (576 tokens per image; a narrow 2-layer tower, the cost of interest is
the LLM's), a Llama LLM of --width / --intermediate / --layers. Unpruned and pruned requests
differ only in their `mm_processor_kwargs` (`otprune_ratio` 1.0 vs --ratio), so both run in the
SAME engine and the ratios come from one run, phases interleaved (unpruned, pruned, unpruned,
pruned, ...). Every request has its own random image (no encoder or prefix cache reuse).

- throughput: --requests requests with --max-tokens new tokens each, in one `LLM.generate` call:
  requests/s;
- TTFT: single requests with 1 new token (prefill only, the whole request's latency is its time
  to first token): median over --ttft-repeats, split into
  - selection: the plugin's `otprune_prune` (`otprune.select_tokens` on the projected rows);
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


def _image(seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (480, 640, 3), dtype=np.uint8))


PARTS = ("tower", "select", "prefill")  # measured per request: vision tower + projector, selection, LLM forward


def _install_timers(model) -> None:
    """Wrap the model's `embed_multimodal` (tower + projector + selection), `otprune_prune` (selection)
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
    model.otprune_prune = timed("select", model.otprune_prune)
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
    *, width: int, intermediate: int, layers: int, heads: int, ratio: float, requests: int, max_tokens: int,
    rounds: int, ttft_repeats: int, progress: Callable[[str], None],
) -> ServeResult:  # fmt: skip
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: the timers read the model
    for name in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO"):  # both phases' ratios come per request
        os.environ.pop(name, None)
    from vllm import LLM, SamplingParams

    from otprune import flops
    from otprune.serve.tiny import write_tiny_llava

    with tempfile.TemporaryDirectory(prefix="otprune-bench-serve-") as folder:
        progress(f"writing a random LLaVA-1.5-geometry checkpoint (336 px CLIP, LLM d={width}, m={intermediate}, "
                 f"{layers} layers)")  # fmt: skip
        path = write_tiny_llava(folder, image_size=336, hidden_size=width, layers=layers, heads=heads,
                                intermediate_size=intermediate)  # fmt: skip
        progress("starting the vLLM engine")
        start = time.perf_counter()
        llm = LLM(model=str(path), dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=False,
                  mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 1})  # fmt: skip
        start_s = time.perf_counter() - start
        try:
            seed = iter(range(10**6))

            def batch(count: int, value: float) -> list[dict]:
                return [{"prompt": PROMPT, "multi_modal_data": {"image": _image(next(seed))},
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
    visual = (336 // 14) ** 2
    kept = visual - (lengths["unpruned"] - lengths["pruned"])
    size = flops.DecoderSize(hidden=width, intermediate=intermediate, layers=layers)
    full, pruned = flops.sequence_flops(lengths["unpruned"], size, visual_tokens=visual, ratio=ratio)
    return ServeResult(
        visual_tokens=visual, kept_tokens=kept, prompt_tokens=lengths["unpruned"], pruned_prompt_tokens=lengths["pruned"],
        throughput=throughput, ttft_ms=ttft, ttft_parts=parts, flops_ratio=pruned / full, start_s=start_s, width=width,
        intermediate=intermediate, layers=layers, requests=requests, max_tokens=max_tokens, ratio=ratio,
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

    def row(name: str, part: str, flops: str) -> str:
        full, pruned = split["unpruned"][part], split["pruned"][part]
        ratio = f"{pruned / full:.3f}" if full > 0 and part != "select" else "-"  # unpruned: nothing selected
        return f"| {name} | {full:.0f} | {pruned:.0f} | {ratio} | {flops} |"

    lines = [
        f"vLLM offline, one engine, OTPrune r = {r.ratio} per request (mm_processor_kwargs otprune_ratio) vs unpruned;",
        f"LLaVA-1.5 geometry: 336 px CLIP -> {r.visual_tokens} visual tokens per image, kept {r.kept_tokens}; "
        f"prompt {r.prompt_tokens} -> {r.pruned_prompt_tokens} tokens; random LLM d={r.width}, m={r.intermediate}, "
        f"{r.layers} layers, fp32; engine start {r.start_s:.0f} s",
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

    for flag in ("width", "intermediate", "layers", "heads", "requests", "max_tokens", "rounds", "ttft_repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be an integer >= 1")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"--ratio={args.ratio}: must be in (0, 1], e.g. 0.098")
    if args.width % args.heads or args.width // args.heads < 32:
        raise ValueError(f"--width {args.width} / --heads {args.heads}: head size must be an integer >= 32 (vLLM CPU)")
    result = run(
        width=args.width, intermediate=args.intermediate, layers=args.layers, heads=args.heads, ratio=args.ratio,
        requests=args.requests, max_tokens=args.max_tokens, rounds=args.rounds, ttft_repeats=args.ttft_repeats,
        progress=progress,
    )  # fmt: skip
    print(format_table(result))
    return 0
