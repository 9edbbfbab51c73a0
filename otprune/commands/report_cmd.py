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
  table_wilcoxon.{md,csv}      one-sided Wilcoxon signed-rank test of --pair (default OTPrune vs DivPrune):
                               per model at one setting (--setting, default Table 1's 0.098,0) over the
                               paper's 11 metrics, models pooled at that setting; other settings apart
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
    parser.add_argument("--setting", default="0.098,0", metavar="RATIO,LAYER",
                        help="the Wilcoxon test's setting: kept ratio and layer (default: Table 1's, 0.098,0); "
                        "every other setting the runs hold is tested apart")
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
    parts = [part.strip() for part in args.setting.split(",")]
    try:
        setting = (float(parts[0]), int(parts[1]))
        if len(parts) != 2 or not 0 < setting[0] <= 1 or setting[1] < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise SystemExit(f"otprune report: --setting {args.setting!r}: give RATIO,LAYER with the ratio in (0, 1] and "
                         "the layer >= 0, e.g. 0.098,0") from None
    return report_main(args.log_dir, args.out, pair=pair, quiet=args.quiet, setting=setting)
