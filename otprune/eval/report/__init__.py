"""The paper-style results table (Table 1) from lmms-eval logs and our per-sample records.

Input, found recursively under a log folder (`collect`):

- lmms-eval 0.7 results, `<output_path>/<model>/<date>_results.json`: per task a dict of
  `"<metric>,<filter>": value` under "results", the model name, the command line under
  "config" / "resolved_cli_args" and the start `date` (in `--timezone`, default Asia/Singapore);
- our records (`otprune.eval.records`): JSONL files whose lines carry the "otprune_record" marker, one
  line per sample with method, layer, ratio, TFLOPs and latencies.

Each group of records (one `run` = one process) is matched to the results file it belongs to by
the run's identity, never by time (`collect`): the `run_id` of run_OTPrune.sh's lmms-eval call,
in every record and in the otprune_run.json of the call's own folder; records without an id only
when their folder holds a single results file for their tasks and no records of another setting.
Unreadable or foreign files and invalid record lines are skipped with a warning naming them (in
the notes and on stderr). The records give the row's settings (method, layer, ratio, the method parameters, order,
recipe: `otprune.eval.records.setting_keys()`) and its FLOPs and latency; results without records
take them from run_OTPrune.sh's `otprune_run.json`.

Output (`rows`, `scores`, `tables`, `plots`): one row per model x setting (method, kept ratio, layer,
and the method parameters / order / recipe, which the method label shows when they are not the
method's defaults), each task's headline metric (`headlines`; scaled as in the paper: accuracies in
%, CIDEr and MME raw), mean TFLOPs and their % of unpruned (the mean over tasks of pruned /
unpruned, as the paper computes it), mean prefill latency and selection time, and the average rank
among the pruned rows of the same model and kept ratio.

A new analysis is a new module here that reads `Report` / `Row` and is called from `build_report`
or `write_report`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from otprune.eval import atomic
from otprune.eval.report.collect import (
    DEFAULT_TIMEZONE,
    RUN_INFO,
    RecordRun,
    ResultFile,
    associate,
    find_record_runs,
    find_result_files,
    parse_result_file,
    run_info,
)
from otprune.eval.report.figures import write_figures
from otprune.eval.report.headlines import (
    EXTRA_COLUMNS,
    HEADLINES,
    PAPER_TASKS,
    SMOKE_TASKS,
    Headline,
    headline,
    metric_value,
    task_order,
)
from otprune.eval.report.plots import plot
from otprune.eval.report.provenance import DEFAULT_MMBENCH_JUDGE, provenance
from otprune.eval.report.rows import (
    MODEL_ORDER,
    UNKNOWN_METHOD,
    Report,
    Row,
    collect_rows,
    method_label,
    model_label,
    row_label,
    row_order,
)
from otprune.eval.report.scores import average_ranks, relative_scores
from otprune.eval.report.tables import (
    columns,
    flops_unit,
    markdown_table,
    table_cells,
    task_headline,
    to_csv,
    to_markdown,
)


def build_report(log_dir: str | os.PathLike) -> Report:
    """Read everything under `log_dir` and build the table (raises ValueError if there are no results)."""
    root = Path(log_dir)
    if not root.exists():
        raise FileNotFoundError(f"LOG_DIR={str(log_dir)!r}: no such directory")
    if not root.is_dir():
        raise ValueError(f"LOG_DIR={str(log_dir)!r}: not a directory")
    warnings: list[str] = []
    results = find_result_files(root, warnings)
    if not results:
        _warn(warnings)
        raise ValueError(
            f"LOG_DIR={str(log_dir)!r}: no lmms-eval results (*_results.json) found under it; run lmms-eval with "
            f"--output_path {log_dir} (or `bash run_OTPrune.sh --log-dir {log_dir}`, `bash run_OTPrune.sh --smoke`) first"
        )
    runs = find_record_runs(root, warnings)
    _warn(warnings)
    matched, unmatched = associate(results, runs)
    notes = [f"warning: {warning}" for warning in warnings]
    for run in unmatched:
        files = ", ".join(sorted(str(path.relative_to(root)) for path in run.files))
        if run.run_id is not None:
            notes.append(f"records of run id {run.run_id} ({files}) match no results file of that run (interrupted or "
                         "failed run?); left out")
        else:
            notes.append(f"records of run {run.run} ({files}) have no run id and match no results file unambiguously "
                         "(none, or several in their folder, or records of another setting beside them); left out: give "
                         "each lmms-eval call its own --output_path, or use run_OTPrune.sh")
    runs = [run for run in runs if run not in unmatched]
    rows, tasks, row_notes = collect_rows(results, matched, root)
    average_ranks(rows, tasks)
    score_notes = relative_scores(rows, tasks)  # which columns the aggregates read (issue #23)
    return Report(root, rows, tasks, notes + row_notes + score_notes, provenance(runs, tasks))


def write_report(log_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 pair: tuple[str, str] = ("otprune", "divprune"),
                 setting: tuple[float, int] | None = None) -> tuple[Report, dict[str, Path]]:
    """Build the report and write markdown, CSV and (when useful) the PNG, and the paper's analyses
    the runs hold (`figures`: Fig. 2-5, the Wilcoxon test of `pair` at `setting` = (kept ratio,
    layer), default Table 1's); returns what was written."""
    report = build_report(log_dir)
    markdown = Path(out) if out is not None else Path(log_dir) / "otprune_report.md"
    # Each file is written to a temporary file beside it and renamed: never through a link.
    atomic.write_text(markdown, to_markdown(report))
    written = {"markdown": markdown}
    table = markdown.with_suffix(".csv")
    atomic.write_text(table, to_csv(report))
    written["csv"] = table
    picture = markdown.with_suffix(".png")
    with atomic.replacing(picture) as temporary:
        drawn = plot(report, temporary)
        if not drawn:
            temporary.unlink()  # nothing to draw: an existing picture is left as it is
    if drawn:
        written["png"] = picture
    written.update(write_figures(report, markdown.parent, markdown.stem, pair,  # Fig. 2-5, Wilcoxon (when held)
                                 **({} if setting is None else {"setting": setting})))
    return report, written


def _warn(warnings: list[str]) -> None:
    """Print the report's warnings (skipped files and lines) on stderr."""
    for warning in warnings:
        print(f"otprune report: warning: {warning}", file=sys.stderr)


__all__ = [
    "DEFAULT_MMBENCH_JUDGE", "DEFAULT_TIMEZONE", "EXTRA_COLUMNS", "HEADLINES", "MODEL_ORDER", "PAPER_TASKS", "RUN_INFO",
    "SMOKE_TASKS", "UNKNOWN_METHOD", "Headline", "RecordRun", "Report", "ResultFile", "Row", "associate",
    "average_ranks", "build_report", "collect_rows", "columns", "find_record_runs", "find_result_files", "flops_unit",
    "headline", "markdown_table", "method_label", "metric_value", "model_label", "parse_result_file", "plot",
    "provenance", "relative_scores", "row_label", "row_order", "run_info", "table_cells", "task_headline",
    "task_order", "to_csv", "to_markdown", "write_figures", "write_report",
]
