"""`otprune bench serve`: the table (no vLLM needed) and the CLI wiring."""

from otprune.bench import serve as bench_serve
from otprune.cli import build_parser


def test_table_reports_ratios_beside_the_flops_prediction():
    result = bench_serve.ServeResult(
        visual_tokens=576, kept_tokens=56, prompt_tokens=626, pruned_prompt_tokens=106,
        throughput={"unpruned": [0.5, 0.6], "pruned": [2.0, 2.4]}, ttft_ms={"unpruned": [1200.0], "pruned": [180.0]},
        ttft_parts={"unpruned": {"tower": [40.0], "select": [0.0], "prefill": [1000.0]},
                    "pruned": {"tower": [40.0], "select": [10.0], "prefill": [150.0]}},
        flops_ratio=0.153, start_s=30.0, width=1024, intermediate=2816, layers=4, requests=16, max_tokens=16, ratio=0.098,
    )  # fmt: skip
    table = bench_serve.format_table(result)
    assert "576 visual tokens per image, kept 56" in table
    assert "| 0.55 | 2.20 | 0.250 (time) | 0.153 |" in table
    assert "| 1200 | 180 | 0.150 | (the formula counts the LLM only) |" in table
    assert "| - preprocessing + vision tower, ms | 200 | 20 | 0.100 | not counted (the tower runs on all tokens) |" in table
    assert "|   of which vision tower + projector, ms | 40 | 40 | 1.000 | not counted |" in table
    assert "| - selection, ms | 0 | 10 | - | not counted |" in table
    assert "| - LLM prefill, ms | 1000 | 150 | 0.150 | 0.153 |" in table  # the FLOPs ratio beside the LLM part only


def test_cli_has_bench_serve():
    args = build_parser().parse_args(["bench", "serve", "--ratio", "0.2", "--requests", "4"])
    assert args.needs == ("vllm",) and args.ratio == 0.2 and args.requests == 4
