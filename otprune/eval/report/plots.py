"""The report's figure: each setting's score relative to the unpruned model over the kept ratios (PNG)."""

from __future__ import annotations

import os
from collections import defaultdict

from otprune.eval.report.rows import Report, Row, model_label, row_label


def line_key(row: Row) -> tuple:
    """The line a row belongs to: its model and every setting but the kept ratio."""
    return (row.model, *(value for key, value in row.settings.items() if key != "ratio"))


def plot(report: Report, path: str | os.PathLike) -> bool:
    """PNG of relative score (% of the unpruned model, mean over tasks) vs kept ratio; False if
    fewer than two kept ratios or no unpruned rows to compare with."""
    points: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    labels: dict[tuple, str] = {}
    for row in report.rows:
        if row.pruned and isinstance(row.ratio, (int, float)) and row.relative is not None:
            line = line_key(row)
            points[line].append((row.ratio, row.relative))
            labels[line] = f"{model_label(row.model)} {row_label(row)}" + ("" if not row.layer else f" L{row.layer}")
    if len(report.ratios) < 2 or not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=120)
    for line, values in sorted(points.items(), key=lambda item: str(item[0])):
        values.sort()
        axes.plot([100 * ratio for ratio, _ in values], [score for _, score in values], marker="o", label=labels[line])
    axes.axhline(100.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("kept visual tokens (%)")
    axes.set_ylabel("score relative to unpruned (%)")
    axes.set_title("Relative score vs kept ratio")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return True
