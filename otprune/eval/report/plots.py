"""The report's figure: each setting's score relative to the unpruned model over the kept ratios
(PNG), in the methods' fixed styles (`styles`)."""

from __future__ import annotations

import os
from collections import defaultdict

from otprune.eval.report.rows import Report, Row, model_label, row_label
from otprune.eval.report.styles import draw_order, marker_size, overlap_label, style


def line_key(row: Row) -> tuple:
    """The line a row belongs to: its model and every setting but the kept ratio."""
    return (row.model, *(value for key, value in row.settings.items() if key != "ratio"))


def lines(report: Report) -> dict[tuple, dict]:
    """line key -> {"method", "label", "points": [(kept %, relative score %)]} of the pruned rows."""
    found: dict[tuple, dict] = defaultdict(lambda: {"points": []})
    for row in report.rows:
        if row.pruned and isinstance(row.ratio, (int, float)) and row.relative is not None:
            line = found[line_key(row)]
            line["points"].append((100 * row.ratio, row.relative))
            line["method"] = row.method
            line["label"] = f"{model_label(row.model)} {row_label(row)}" + ("" if not row.layer else f" L{row.layer}")
    for line in found.values():
        line["points"].sort()
    return dict(found)


def draw(report: Report):
    """The figure (matplotlib), or None with fewer than two kept ratios or nothing to compare with."""
    found = lines(report)
    if len(report.ratios) < 2 or not found:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=110)
    drawn: dict = {}
    order = draw_order({line["method"] for line in found.values()})
    for key in sorted(found, key=lambda k: (order.index(found[k]["method"]), str(k))):
        line = found[key]
        look = style(line["method"])
        axes.plot([x for x, _ in line["points"]], [y for _, y in line["points"]], color=look.colour,
                  marker=look.marker, linestyle=look.linestyle, markerfacecolor="none",
                  markersize=marker_size(line["method"]), label=overlap_label(line["label"], line["points"], drawn))
    axes.axhline(100.0, color="grey", linestyle="--", linewidth=1, label="unpruned (100%)")
    axes.set_xlabel("kept visual tokens (% of the image's tokens)")
    axes.set_ylabel("score relative to unpruned (%)")
    axes.set_title("Relative score vs kept ratio (mean over the aggregated metrics)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot(report: Report, path: str | os.PathLike) -> bool:
    """PNG of relative score (% of the unpruned model, mean over the aggregated tasks) vs kept
    ratio; False if fewer than two kept ratios or no unpruned rows to compare with."""
    figure = draw(report)
    if figure is None:
        return False
    from matplotlib import pyplot

    figure.savefig(path, format="png")
    pyplot.close(figure)
    return True
