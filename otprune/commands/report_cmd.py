"""`otprune report LOG_DIR [--out table.md]`: the paper-style table from lmms-eval logs."""

from __future__ import annotations

import argparse

EPILOG = """\
Reads, recursively under LOG_DIR, lmms-eval's <date>_results.json files and the per-sample records
(otprune_records_*.jsonl, written beside them while the llava model runs), and writes:
  table.md   one row per model x method x kept ratio x layer: each task's headline metric
             (e.g. GQA EM, MME perception, POPE F1, CIDEr), mean TFLOPs and % of unpruned,
             mean prefill latency and selection time, average rank among the pruned rows
  table.csv  the same numbers unformatted
  table.png  relative score vs kept ratio, when several kept ratios are present
and, whenever the runs hold what they need (records with the per-image OT distance of the kept
tokens, OTPRUNE_DISTANCE; several methods, ratios or gammas), the paper's analyses beside it:
  table_fig2.{md,csv,png}      Spearman rho / p of OT-distance rank vs task-score rank, per task and pooled
  table_fig3.{md,csv}, table_fig4.{md,csv}, table_fig34.png
                               relative performance (pruned / original) and OT distance / OTPrune's over ratios
  table_fig5.{md,csv,png}      OTPrune over gamma
  table_wilcoxon.{md,csv}      one-sided Wilcoxon signed-rank test of --pair (default OTPrune vs DivPrune)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="Results table (markdown, CSV, plot) from lmms-eval logs",
        description="Build the OTPrune paper's Table 1 from lmms-eval results and per-sample records.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("log_dir", metavar="LOG_DIR", help="folder with lmms-eval outputs (searched recursively)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: LOG_DIR/otprune_report.md); "
                        "the CSV and PNG go beside it")
    parser.add_argument("--pair", default="otprune,divprune", metavar="A,B",
                        help="methods of the Wilcoxon test: is A better than B? (default: otprune,divprune)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    from otprune.config import canonical_method
    from otprune.eval.report import report_main

    names = [name.strip() for name in args.pair.split(",") if name.strip()]
    if len(names) != 2:
        raise SystemExit(f"otprune report: --pair {args.pair!r}: give two methods, e.g. otprune,divprune")
    try:
        pair = (canonical_method(names[0]), canonical_method(names[1]))
    except ValueError as err:
        raise SystemExit(f"otprune report: --pair {args.pair!r}: {err}") from None
    return report_main(args.log_dir, args.out, pair=pair, quiet=args.quiet)
