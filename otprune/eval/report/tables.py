"""The report as text: the markdown table (a GitHub pipe table, with its legend, provenance and
notes) and the CSV with the unformatted numbers (one column per registered method parameter)."""

from __future__ import annotations

import csv
import io

from tabulate import tabulate

from otprune.eval import adaptive
from otprune.eval.records import param_keys
from otprune.eval.report.headlines import HEADLINES, Headline, headline
from otprune.eval.report.rows import Report, method_label, model_label, row_label
from otprune.flops import format_percent

LEFT_COLUMNS = 4  # Model, Method, Layer, Kept: left-aligned; the numbers after them right-aligned
LEGEND = (
    "FLOPs: mean over tasks of the per-sample decoder FLOPs (4nd^2 + 2n^2d + 2ndm per layer, actual lengths); "
    "% = mean over tasks of pruned / unpruned. Prefill / Select: mean per sample. "
    "Avg. rank: per task, rank among the pruned rows of the same model and kept ratio (1 = best), averaged over "
    "the paper's 11 metrics (extra columns such as MME C are shown, never aggregated; see the notes)."
)


def flops_unit(report: Report) -> tuple[str, float]:
    """(unit, factor from TFLOPs): TFLOPs for real models, smaller units for tiny test models."""
    values = [value for row in report.rows if (value := row.tflops()) is not None]
    largest = max(values, default=1.0)
    for unit, factor in (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6)):
        if largest * factor >= 0.1:
            return unit, factor
    return "kFLOPs", 1e9


def task_headline(task: str, report: Report) -> Headline:
    """The headline of a task column (for unknown tasks, the one found in its results)."""
    if task in HEADLINES:
        return HEADLINES[task]
    for row in report.rows:
        source = row.sources.get(task)
        if source is not None:
            found = headline(task, source.tasks[task], source.higher_is_better.get(task))
            if found is not None:
                return found[0]
    return Headline("?", task, 1.0, 3)


def columns(report: Report) -> list[str]:
    labels = [task_headline(task, report).label for task in report.tasks]
    unit = flops_unit(report)[0]
    return ["Model", "Method", "Layer", "Kept", f"{unit} (% unpruned)", *labels, "Prefill ms", "Select ms", "Peak mem (GB)", "Avg. rank"]


def model_labels(report: Report) -> dict[str, str]:
    """Each row's model label (unique per model identity and scope: `rows.label_models`)."""
    return {row.model: model_label(row.model) for row in report.rows}


def table_cells(report: Report) -> list[list[str]]:
    """The markdown table's cells, one list per row, in `columns` order."""
    cells = []
    labels = model_labels(report)
    factor = flops_unit(report)[1]
    digits = [task_headline(task, report).digits for task in report.tasks]
    for row in report.rows:
        tflops, percent = row.tflops(), row.tflops_percent()
        flops_cell = "–" if tflops is None else f"{tflops * factor:.3f}" + ("" if percent is None else f" ({format_percent(percent)}%)")
        scores = [_fmt(row.scores.get(task), places) for task, places in zip(report.tasks, digits, strict=True)]
        if adaptive.is_adaptive(row.ratio):  # per-image budgets: Table 1's "Variable", per-sample mean
            flops_cell = adaptive.flops_cell(flops_cell)
            kept = adaptive.kept_cell(row.buckets.values())
        else:
            kept = "100%" if row.method is None else ("–" if row.ratio is None else f"{100 * row.ratio:.4g}%")
        cells.append(
            [labels[row.model], adaptive.starred(row_label(row), row.method, row.ratio),
             "–" if row.layer is None else str(row.layer), kept, flops_cell,
             *scores, _fmt(row.mean("prefill_ms"), 1), _fmt(row.mean("select_ms"), 2),
             _fmt(row.peak_memory_gb(), 2), _fmt(row.rank, 2)]
        )
    return cells


def markdown_table(report: Report) -> str:
    """The table alone, as a GitHub pipe table."""
    head = columns(report)
    align = ["left"] * LEFT_COLUMNS + ["right"] * (len(head) - LEFT_COLUMNS)
    return tabulate(table_cells(report), headers=head, tablefmt="pipe", colalign=align, disable_numparse=True)


def to_markdown(report: Report) -> str:
    lines = [f"# OTPrune results: {report.log_dir}", "", markdown_table(report), "", LEGEND]
    if report.provenance:
        lines += ["", " ".join(report.provenance)]
    if report.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in report.notes]]
    if report.unverified:
        lines += ["", "Unverified runs (in no table, figure or test: their records do not prove their setting):",
                  *[f"- {line}" for line in report.unverified]]
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    names = param_keys()
    task_columns = [f"{task}:{task_headline(task, report).metric}" for task in report.tasks]
    writer.writerow(
        ["model", "model_id", "method", "layer", "ratio", *names, "order", "recipe", "tflops", "tflops_percent", *task_columns,
         "prefill_ms", "select_ms", "peak_memory_gb", "avg_rank", "relative_score", "samples"]
    )
    for row in report.rows:
        values = [row.layer, row.ratio, *(row.params.get(name) for name in names), row.order, row.recipe, row.tflops(),
                  row.tflops_percent(), *(row.scores.get(task) for task in report.tasks), row.mean("prefill_ms"),
                  row.mean("select_ms"), row.peak_memory_gb(), row.rank, row.relative]
        writer.writerow([model_label(row.model), "" if row.spec is None else row.spec.model, method_label(row.method), *("" if value is None else value for value in values),
                         row.samples()])
    return out.getvalue()


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
