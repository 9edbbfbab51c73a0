"""The paper-style results table (Table 1) from lmms-eval logs and our per-sample records.

Input, found recursively under a log folder (`collect`, `otprune.eval.evidence`):

- lmms-eval 0.7 results, `<output_path>/<model>/<date>_results.json`: per task a dict of
  `"<metric>,<filter>": value` under "results", the number of documents under "n-samples";
- the evidence of the processes that wrote them: our records files (`otprune.eval.records`), each
  with the process's `RunSpec`, one record per request with the pruning it applied, and a closing
  line naming (by sha256) the results file the process wrote.

A results file enters the tables only through a verified run (`otprune.eval.evidence.verify`):
the row is the run's spec, its settings are the records', and the row is shown only when the
records prove that the spec's pruning ran on every request. Everything else is listed under
"Unverified runs" with the reason, and kept out of every table, figure and test. Unreadable or
foreign files and invalid record lines are skipped with a warning naming them.

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

from otprune.eval import atomic, evidence
from otprune.eval.report.collect import DEFAULT_TIMEZONE, ResultFile, find_result_files, parse_result_file
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
            f"--output_path {log_dir} (or `otprune run --log-dir {log_dir}`, `bash run_OTPrune.sh --smoke`) first"
        )
    runs = evidence.scan(root, warnings)
    _warn(warnings)
    by_digest = {result.digest: result for result in results if result.digest}
    verified, unverified, claimed = [], [], set()
    for run in runs:
        problems = evidence.verify(run, by_digest, root)
        result = next((by_digest[d] for d in run.results_digests if d in by_digest), None)
        if result is not None:
            claimed.add(result.path)
        if problems:
            spec = run.spec
            what = f"{spec.task} / {spec.tag()} ({spec.model})" if spec is not None else "?"
            where = ", ".join(str(path.relative_to(root)) for path in run.files)
            unverified.append(f"run {run.name}: {what}: {'; '.join(problems)} [{where}]")
        else:
            verified.append((run, result))
    for result in results:
        if result.path not in claimed:
            unverified.append(f"{result.path.relative_to(root)}: no otprune records name this results file (lmms-eval "
                              "ran without otprune's lmms_eval.models entry point, or with OTPRUNE_RECORDS=off); "
                              "its model and pruning are unproven")
    notes = [f"warning: {warning}" for warning in warnings]
    rows, tasks, row_notes = collect_rows(verified, root)
    average_ranks(rows, tasks)
    notes += relative_scores(rows, tasks)  # and which columns the aggregates read (issue #23)
    if not rows:
        notes.append("no verified run: every results file is listed under \"Unverified runs\"")
    report = Report(root, rows, tasks, notes + row_notes, provenance([run for run, _ in verified], tasks))
    report.unverified = unverified
    return report


def write_report(log_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 pair: tuple[str, str] = ("otprune", "divprune"),
                 setting: tuple[float, int] | None = None) -> tuple[Report, dict[str, Path]]:
    """Build the report and write markdown, CSV and (when useful) the PNG, and the paper's analyses
    the runs hold (`figures`: Fig. 2-5, the Wilcoxon test of `pair` at `setting` = (kept ratio,
    layer), default Table 1's); returns what was written.

    Every file goes through `otprune.eval.atomic` (random temporary name, renamed into place, never
    through a link). The artefacts of an earlier report of the same name that this one does not
    rewrite are removed (listed under "stale" in the result), so no old figure stands beside a new
    table. A folder that cannot be written raises `atomic.WriteError` naming it."""
    report = build_report(log_dir)
    markdown = Path(out) if out is not None else Path(log_dir) / "otprune_report.md"
    atomic.write_text(markdown, to_markdown(report))
    written = {"markdown": markdown}
    table = markdown.with_suffix(".csv")
    atomic.write_text(table, to_csv(report))
    written["csv"] = table
    picture = markdown.with_suffix(".png")
    with atomic.replacing(picture) as temporary:
        drawn = plot(report, temporary)
        if not drawn:
            temporary.unlink()
    if drawn:
        written["png"] = picture
    written.update(write_figures(report, markdown.parent, markdown.stem, pair,  # Fig. 2-5, Wilcoxon (when held)
                                 **({} if setting is None else {"setting": setting})))
    for index, path in enumerate(remove_stale(markdown, set(written.values()))):
        written[f"stale_{index}"] = path
    return report, written


def report_main(log_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                pair: tuple[str, str] = ("otprune", "divprune"), quiet: bool = False,
                setting: tuple[float, int] | None = None) -> int:
    """`otprune report`: write the report, print the table and what was written; exit status (1 when the
    folder cannot be written, with one line naming it)."""
    try:
        report, written = write_report(log_dir, out, pair=pair, setting=setting)
    except atomic.WriteError as err:
        print(f"otprune report: error: {err.strerror}; write the report elsewhere with --out DIR/table.md",
              file=sys.stderr)
        return 1
    if not quiet:
        print(to_markdown(report), end="")
        print()
    for kind, path in written.items():
        print(f"removed stale {path}" if kind.startswith("stale_") else f"wrote {kind}: {path}")
    if report.unverified:
        print(f"otprune report: {len(report.unverified)} unverified runs left out (listed in {written['markdown']})",
              file=sys.stderr)
    return 0


def artefacts(markdown: Path) -> list[Path]:
    """The files a report named `markdown` may write beside it: its .csv / .png and `<stem>_<name>.{md,csv,png}`."""
    folder, stem = markdown.parent, markdown.stem
    found = [folder / f"{stem}.png"]
    for path in folder.glob(f"{stem}_*"):
        name = path.name[len(stem) + 1:]
        if path.suffix in (".md", ".csv", ".png") and name[: -len(path.suffix)].replace("_", "").isalnum():
            found.append(path)
    return [path for path in found if path.is_file() or path.is_symlink()]


def remove_stale(markdown: Path, written: set[Path]) -> list[Path]:
    """Remove the artefacts of an earlier report (`artefacts`) that this report did not write; returns them."""
    stale = [path for path in artefacts(markdown) if path not in written]
    for path in stale:
        path.unlink()
    return stale


def _warn(warnings: list[str]) -> None:
    """Print the report's warnings (skipped files and lines) on stderr."""
    for warning in warnings:
        print(f"otprune report: warning: {warning}", file=sys.stderr)


__all__ = [
    "DEFAULT_MMBENCH_JUDGE", "DEFAULT_TIMEZONE", "EXTRA_COLUMNS", "HEADLINES", "MODEL_ORDER", "PAPER_TASKS",
    "SMOKE_TASKS", "UNKNOWN_METHOD", "Headline", "Report", "ResultFile", "Row",
    "average_ranks", "build_report", "collect_rows", "columns", "find_result_files", "flops_unit",
    "headline", "markdown_table", "method_label", "metric_value", "model_label", "parse_result_file", "plot",
    "provenance", "relative_scores", "report_main", "row_label", "row_order", "table_cells", "task_headline",
    "task_order", "to_csv", "to_markdown", "write_figures", "write_report",
]
