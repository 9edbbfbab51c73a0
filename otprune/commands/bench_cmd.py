"""`otprune bench selection` / `otprune bench prefill`: time the selection methods against their
cost floor, and a whole multimodal prefill unpruned vs pruned."""

from __future__ import annotations

import argparse

from otprune.hf.families import FAMILIES

FAMILY_CHOICES = ["all", *FAMILIES]
LAYERS_ONE_FAMILY = 4
LAYERS_ALL = 1  # `--family all` runs seven models (nine inputs); one layer keeps the default run at minutes on 2 cores


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Benchmark the selection methods, or a whole prefill unpruned vs pruned",
        description=(
            "selection: time every selection method on random features against OTPrune's cost floor. "
            "prefill: time one multimodal forward (prompt + image) of each model family unpruned and pruned, "
            "with random weights at the real LLM sizes. `otprune bench WHAT --help` for the options."
        ),
    )
    what = parser.add_subparsers(dest="what", metavar="WHAT")
    what.required = True
    _register_selection(what)
    _register_prefill(what)
    _register_serve(what)
    _register_distance(what)


def _register_serve(what) -> None:
    parser = what.add_parser(
        "serve",
        help="vLLM offline throughput and time to first token, unpruned vs pruned (serve venv)",
        description=(
            "One vLLM engine with the otprune plugin on a random checkpoint of --family: llava (LLaVA-1.5 geometry, "
            "336 px CLIP tower, 576 tokens per image, a small LLM by default), qwen2_5_vl (448 px image, 256 tokens), "
            "qwen3_vl (448 px, 196 tokens), internvl (1344 x 896 image: 6 tiles of 448 px + thumbnail, 1792 tokens) "
            "or gemma3 (896 px, 256 tokens) at their real 7B / 8B / 4B LLM sizes by default with --layers decoder layers "
            "(--media video: qwen2_5_vl / qwen3_vl with an 8-frame video of 448 px frames, 1024 / 784 tokens); "
            "families whose architecture the plugin does not prune are refused. Requests/s and time to first token "
            "unpruned (otprune_ratio 1.0) vs pruned (--ratio), interleaved in the same engine, beside the ratio the "
            "FLOPs formula predicts. Needs the serve extra (make serve-venv)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--family", default="llava", help="model family (one the vLLM plugin prunes)")
    parser.add_argument("--ratio", type=float, default=0.098, help="kept fraction of each image's / video's tokens")
    parser.add_argument("--media", choices=("image", "video"), default="image",
                        help="every request's input: one image, or one 8-frame video of 448 px frames (qwen2_5_vl, qwen3_vl)")
    parser.add_argument("--width", type=int, default=None, help="LLM hidden size d (default: llava 1024, others the real model's)")
    parser.add_argument("--intermediate", type=int, default=None, help="LLM FFN size m (default: llava 2816, others the real model's)")
    parser.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: llava 4, others 2)")
    parser.add_argument("--heads", type=int, default=None, help="LLM attention heads, head size >= 32 (default: llava 16, others the real model's)")
    parser.add_argument("--kv-heads", type=int, default=None, help="LLM key/value heads (default: llava heads / 2, others the real model's)")
    parser.add_argument("--requests", type=int, default=16, help="requests per throughput round")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (throughput)")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per phase")
    parser.add_argument("--ttft-repeats", type=int, default=5, help="single-request TTFT measurements per phase")
    parser.set_defaults(run=run_serve, needs=("vllm",))


def run_serve(args) -> int:
    from otprune.bench import serve as bench_serve

    return bench_serve.main(args)


def _register_selection(what) -> None:
    parser = what.add_parser(
        "selection",
        help="time the selection methods against the cost floor",
        description=(
            "Time every selection method on random features and compare OTPrune with its cost floor, "
            "one Xn @ Xn.T product (N x N x D), measured in the same process (ratios from paired runs). "
            "Also compares a batch of B images in one call with B single calls (per-sample time)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default="576,1152,2880", help="token counts N, comma-separated")
    parser.add_argument("--dim", type=int, default=4096, help="feature dimension D (4096 = LLaVA-7B)")
    parser.add_argument("--ratio", type=float, default=0.098, help="kept ratio")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per measurement")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the batched-vs-single comparison")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--busy", type=int, default=0,
        help="busy-loop neighbour processes to run during the benchmark (CPU contention, as on a shared machine)",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="also time every method eager vs compiled (torch.compile(fullgraph=True), as OTPRUNE_COMPILE=1)",
    )  # fmt: skip
    parser.set_defaults(run=run)


def _register_prefill(what) -> None:
    parser = what.add_parser(
        "prefill",
        help="time a multimodal prefill unpruned vs pruned (random weights, real LLM sizes, CPU)",
        description=(
            "Build each model family (transformers' LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, "
            "InternVL, Gemma 3 classes) "
            "offline with random weights at the real hidden / FFN sizes and heads of its LLM but only --layers "
            "decoder layers, and a tiny vision tower that gives the real number of visual tokens per image. Time one "
            "forward over a prompt with one image or video (fp32, CPU) unpruned and with otprune.hf.apply(model, "
            "PruneConfig(method, layer=0, ratio)): paired runs after a warm-up, medians. The table gives the "
            "measured pruned/unpruned time ratio (whole forward, and inside the LLM only) next to the ratio that "
            "the FLOPs formula 4nd^2 + 2n^2d + 2ndm predicts for the same token counts and sizes."
        ),
    )
    parser.add_argument("--family", choices=FAMILY_CHOICES, default="all", help="model family, or all of them (default: all)")
    parser.add_argument(
        "--width", type=int, default=None,
        help="LLM hidden size d (default: the family's 7B / 8B / 4B LLM: 4096 for llava / llava_next / qwen3_vl, 3584 "
        "for onevision / qwen2_5_vl / internvl, 2560 for gemma3); a known width takes its real model's FFN size and "
        "heads (e.g. 5120 = 13B; internvl 4096 = InternVL3.5-8B; gemma3 3840 = Gemma-3-12B)",
    )  # fmt: skip
    parser.add_argument("--intermediate", type=int, default=None, help="FFN size m (default: the real model's)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: the real model's)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: the real model's)")
    parser.add_argument(
        "--layers", type=int, default=None,
        help=f"decoder layers built (default: {LAYERS_ONE_FAMILY} for one family, {LAYERS_ALL} for --family all)",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", default=None,
        help="WIDTHxHEIGHT of the image, and of each video frame (default per family: llava / llava_next 640x480 -> "
        "576 / 2340 visual tokens, onevision 384x384 -> 1485, qwen2_5_vl 448x448 -> 256 (8-frame video: 1024), "
        "qwen3_vl 448x448 -> 196 (video: 784), internvl 1344x896 -> 6 tiles + thumbnail = 1792, gemma3 896x896 -> 256)",
    )  # fmt: skip
    parser.add_argument(
        "--media", choices=("all", "image", "video"), default="all",
        help="the inputs of each family: its image and, for qwen2_5_vl / qwen3_vl, its video (all), or one kind",
    )  # fmt: skip
    parser.add_argument("--frames", type=int, default=8, help="frames of the video (default: 8)")
    parser.add_argument("--method", default="otprune", help="selection method of otprune.METHODS (default: otprune)")
    parser.add_argument("--ratio", type=float, default=0.098, help="kept fraction of each image's visual tokens (default: 0.098)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs (unpruned, pruned) after one warm-up pair (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.set_defaults(run=run_prefill, needs=("transformers", "tokenizers"))


def _register_distance(what) -> None:
    parser = what.add_parser(
        "distance",
        help="time the per-image OT distance of the records (OTPRUNE_DISTANCE) at N = 576, 2880",
        description="Time otprune.distance's Eq. 4 distance (OTPRUNE_DISTANCE=eq4) per image on random "
                    "features, and with --exact the exact W2 (POT), to compare with a prefill (`bench prefill`).",
    )
    parser.add_argument("--sizes", default="576,2880", help="token counts N (default: 576,2880)")
    parser.add_argument("--dim", type=int, default=4096, help="feature width D (default: 4096)")
    parser.add_argument("--ratio", type=float, default=0.098, help="kept fraction (default: 0.098)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per size (median; default: 5)")
    parser.add_argument("--exact", action="store_true", help="also time the exact W2 once (POT, the analysis extra)")
    parser.set_defaults(run=run_distance)


def run_distance(args) -> int:
    from otprune.bench import distance as bench_distance

    try:
        sizes = tuple(int(v) for v in args.sizes.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"otprune bench distance: --sizes {args.sizes!r}: comma-separated integers, e.g. 576,2880") from None
    if not sizes or min(sizes) < 1 or args.dim < 1 or args.repeats < 1 or not 0 < args.ratio <= 1:
        raise SystemExit("otprune bench distance: --sizes, --dim, --repeats must be >= 1 and --ratio in (0, 1]")
    print(bench_distance.format_table(bench_distance.run(sizes, args.dim, args.ratio, args.repeats, args.exact)))
    return 0


def run(args) -> int:
    import sys

    from otprune import METHODS
    from otprune.bench import selection as bench

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes={args.sizes!r}: must be comma-separated integers, e.g. 576,1152,2880") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes={args.sizes!r}: every N must be >= 1")
    if args.repeats < 1 or args.batch < 1 or args.dim < 1:
        raise ValueError("--repeats, --batch and --dim must be >= 1")
    if args.busy < 0:
        raise ValueError(f"--busy={args.busy}: must be an integer >= 0")
    methods = None
    if args.methods:
        extra = {name.upper(): name for name in bench.EXTRA_METHODS}  # VisionZip, DART: timed beside them
        methods = [extra.get(m.strip().upper()) or METHODS.canonical(m) for m in args.methods.split(",")]
        if "otprune" not in methods:
            methods.insert(0, "otprune")
    with bench.busy_neighbours(args.busy):
        rows = bench.run(
            sizes, args.dim, args.ratio, methods, args.repeats, args.batch, args.device,
            progress=lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True), compile=args.compile,
        )
    print(bench.format_table(rows, args.dim, args.ratio, args.device, args.busy))
    return 0


def parse_image_size(text: str) -> tuple[int, int]:
    """"640x480" -> (640, 480)."""
    width, sep, height = text.lower().replace(" ", "").partition("x")
    try:
        size = (int(width), int(height)) if sep else None
    except ValueError:
        size = None
    if size is None or min(size) < 1:
        raise ValueError(f"--image-size={text!r}: must be WIDTHxHEIGHT in pixels, e.g. 640x480")
    return size


def prefill_media(bench_prefill, family: str, args) -> tuple:
    """The family's default inputs, of the kind `--media` asks for, at `--image-size` / `--frames`."""
    import dataclasses

    size = parse_image_size(args.image_size) if args.image_size else None
    chosen = []
    for media in bench_prefill.DEFAULT_MEDIA[family]:
        if args.media not in ("all", media.kind):
            continue
        if size is not None:
            media = media.resized(*size)
        if media.kind == "video":
            media = dataclasses.replace(media, frames=args.frames)
        chosen.append(media)
    return tuple(chosen)


def run_prefill(args) -> int:
    import sys

    import torch

    from otprune import METHODS
    from otprune.bench import prefill as bench_prefill

    for flag, value in (("--layers", args.layers), ("--repeats", args.repeats), ("--threads", args.threads),
                        ("--frames", args.frames)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value}: must be an integer >= 1")
    if not 0.0 < args.ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"--ratio={args.ratio}: must be in (0, 1], e.g. 0.098")
    try:
        method = METHODS.canonical(args.method)
    except ValueError as err:
        raise ValueError(f"--method={args.method!r}: {err}") from None
    families = list(bench_prefill.BENCHED) if args.family == "all" else [args.family]
    layers = args.layers or (LAYERS_ALL if args.family == "all" else LAYERS_ONE_FAMILY)
    sizes = {f: bench_prefill.llm_size(f, args.width, args.intermediate, args.heads, args.kv_heads) for f in families}
    media = {f: prefill_media(bench_prefill, f, args) for f in families}
    if args.family != "all" and not media[args.family]:
        raise ValueError(f"--media={args.media}: family {args.family!r} has no {args.media} input here (it takes "
                         f"{', '.join(m.kind for m in bench_prefill.DEFAULT_MEDIA[args.family])})")  # fmt: skip
    families = [f for f in families if media[f]]

    def progress(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        progress(f"prefill benchmark: {', '.join(families)}; {layers} decoder layer(s), {method} ratio {args.ratio}, "
                 f"{args.repeats} timed pair(s) after a warm-up, {torch.get_num_threads()} torch threads")  # fmt: skip
        rows = bench_prefill.run(families, sizes, layers, method, args.ratio, args.repeats, media, progress)
        print(bench_prefill.format_table(rows, method, args.ratio, args.repeats))
    finally:
        torch.set_num_threads(threads)
    return 0
