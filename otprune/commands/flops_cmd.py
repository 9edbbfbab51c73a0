"""`otprune flops`: the paper's FLOPs calculator (docs/ALGORITHM.md 6).

    otprune flops --paper                                   # the paper's TFLOP column
    otprune flops --model-size 13b --ratio 0.2              # paper averaging, other ratio
    otprune flops --llava 1.6 --layer 2 --ratio 0.5         # LLaVA-1.6 token counts, prune at layer 2
    otprune flops --visual-tokens 576 --text-tokens 40      # one sequence
    otprune flops --hidden 2048 --intermediate 5632 --layers 22 --visual-tokens 576 --text-tokens 40
    otprune flops --visual-tokens 576 --text-tokens 40 --schedule 616x2,300x10,72x20   # any per-layer schedule
"""

from __future__ import annotations

import argparse
import json

EPILOG = """\
Per layer with n tokens: 4*n*d^2 + 2*n^2*d + 2*n*d*m; pruning keeps n tokens before --layer and
n - round((1 - ratio) * V) from it on. Without --text-tokens the numbers are the paper's averages
over its 11 benchmarks (its text-token counts; 576 visual tokens for LLaVA-1.5, its per-benchmark
counts for LLaVA-1.6); the percentage is the mean of the per-benchmark ratios, truncated to two
decimals as in the paper.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="FLOPs calculator (the paper's TFLOP column)",
        description="TFLOPs of the LLaVA decoder, unpruned and pruned, with the OTPrune paper's formula.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--paper", action="store_true", help="print the paper's three TFLOP entries (r=0.098, layer 0)")
    parser.add_argument("--model-size", default=None, help="decoder preset: 7b (default) or 13b")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size d (instead of --model-size)")
    parser.add_argument("--intermediate", type=int, default=None, help="FFN size m (instead of --model-size)")
    parser.add_argument("--layers", type=int, default=None, help="number of decoder layers T (instead of --model-size)")
    parser.add_argument("--llava", choices=["1.5", "1.6"], default="1.5", help="visual-token counts of the paper (default 1.5)")
    parser.add_argument("--ratio", type=float, default=None, help="kept fraction of the visual tokens (default 0.098)")
    parser.add_argument("--layer", type=int, default=0, help="decoder layer where pruning happens (default 0 = before the LLM)")
    parser.add_argument("--visual-tokens", type=int, default=None, help="visual tokens V (default 576 for LLaVA-1.5)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens: one sequence of V + this many tokens")
    parser.add_argument(
        "--schedule",
        default=None,
        help="tokens per decoder layer, e.g. '616x2,72x30' (COUNTxREPEATS, comma separated); needs --text-tokens",
    )
    parser.add_argument("--per-benchmark", action="store_true", help="also list the paper's benchmarks one by one")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=run)


def _size(args):
    from otprune import flops

    explicit = [args.hidden, args.intermediate, args.layers]
    if any(value is not None for value in explicit):
        if args.model_size is not None:
            raise ValueError("--model-size: give either a preset or --hidden/--intermediate/--layers, not both")
        if any(value is None for value in explicit):
            raise ValueError("--hidden, --intermediate, --layers: give all three (or use --model-size 7b|13b)")
        return flops.DecoderSize(args.hidden, args.intermediate, args.layers, "custom")
    return flops.model_size(args.model_size or "7b")


def run(args) -> int:
    from otprune import flops

    ratio = flops.PAPER_RATIO if args.ratio is None else args.ratio
    if args.paper:
        if any(v is not None for v in (args.model_size, args.hidden, args.intermediate, args.layers, args.visual_tokens,
                                       args.text_tokens, args.schedule)):
            raise ValueError("--paper: uses the paper's models and token counts; combine it only with --ratio, --layer, --json")
        table = flops.paper_table(ratio=ratio, layer=args.layer)
        if args.json:
            print(json.dumps([_summary_json(label, summary, ratio, args.layer) for label, summary in table], indent=2))
        else:
            print(f"Paper TFLOPs (mean over 11 benchmarks), unpruned -> kept ratio {ratio:g} at layer {args.layer}:")
            for label, summary in table:
                print(summary.line(label))
                if args.per_benchmark:
                    _print_benchmarks(summary)
        return 0

    size = _size(args)
    if args.layer < 0 or args.layer >= size.layers:
        raise ValueError(f"--layer={args.layer}: must be in 0..{size.layers - 1} for a model of {size.layers} layers")

    if args.text_tokens is None:
        if args.schedule is not None:
            raise ValueError("--schedule: needs --text-tokens (and --visual-tokens) for the unpruned sequence")
        if args.visual_tokens is not None:
            visual = args.visual_tokens
        elif args.llava == "1.6":
            visual = flops.PAPER_LLAVA16_VISUAL_TOKENS
        else:
            visual = flops.LLAVA15_VISUAL_TOKENS
        summary = flops.paper_average(size, visual_tokens=visual, ratio=ratio, layer=args.layer)
        label = f"{size.label()}, LLaVA-{args.llava} paper token counts"
        if args.json:
            print(json.dumps(_summary_json(label, summary, ratio, args.layer), indent=2))
        else:
            print(f"mean over the paper's 11 benchmarks, kept ratio {ratio:g} at layer {args.layer}")
            print(summary.line(label))
            if args.per_benchmark:
                _print_benchmarks(summary)
        return 0

    if args.visual_tokens is None and args.llava == "1.6":
        raise ValueError("--visual-tokens: required for one LLaVA-1.6 sequence (its count varies per image, ~1600-2300)")
    visual = flops.LLAVA15_VISUAL_TOKENS if args.visual_tokens is None else args.visual_tokens
    if args.text_tokens < 0:
        raise ValueError(f"--text-tokens={args.text_tokens}: must be >= 0")
    if visual < 0:
        raise ValueError(f"--visual-tokens={visual}: must be >= 0")
    n = visual + args.text_tokens
    full_schedule = flops.prune_schedule(n, size.layers)
    if args.schedule is not None:
        schedule = flops.check_schedule(flops.parse_schedule(args.schedule), size)
        what = "schedule " + flops.compact_schedule(schedule)
    else:
        schedule = flops.prune_schedule(n, size.layers, visual_tokens=visual, ratio=ratio, layer=args.layer)
        what = f"kept ratio {ratio:g} at layer {args.layer}"
    full = flops.schedule_flops(full_schedule, size.hidden, size.intermediate) / flops.TERA
    pruned = flops.schedule_flops(schedule, size.hidden, size.intermediate) / flops.TERA
    percent = 100.0 * pruned / full if full else float("nan")
    if args.json:
        print(json.dumps({
            "model": size.label(), "hidden": size.hidden, "intermediate": size.intermediate, "layers": size.layers,
            "visual_tokens": visual, "text_tokens": args.text_tokens,
            "tokens_per_layer": schedule, "unpruned_tflops": full, "pruned_tflops": pruned, "percent": percent,
        }, indent=2))
    else:
        print(f"{size.label()}: {visual} visual + {args.text_tokens} text tokens, {what}")
        print(f"tokens per layer: {flops.compact_schedule(schedule)}")
        print(f"TFLOPs: {full:.3f} -> {pruned:.3f} ({flops.format_percent(percent)}%)")
    return 0


def _summary_json(label: str, summary, ratio: float, layer: int) -> dict:
    return {
        "model": label,
        "ratio": ratio,
        "layer": layer,
        "unpruned_tflops": summary.unpruned_tflops,
        "pruned_tflops": summary.pruned_tflops,
        "percent": summary.percent,
        "per_benchmark": [
            {"benchmark": name, "text_tokens": text, "visual_tokens": visual, "unpruned_tflops": full, "pruned_tflops": pruned}
            for name, text, visual, full, pruned in summary.per_benchmark
        ],
    }


def _print_benchmarks(summary) -> None:
    from otprune.flops import format_percent

    for name, text, visual, full, pruned in summary.per_benchmark:
        print(f"    {name:<10} text {text:>4}  visual {visual:>5}  {full:.3f} -> {pruned:.3f} ({format_percent(100 * pruned / full)}%)")
