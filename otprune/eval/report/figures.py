"""The paper's analyses beyond Table 1, from the same rows (issues #16 point 2, #23).

Each needs the per-image distance of the kept tokens that records carry (`otprune.distance`,
`OTPRUNE_DISTANCE`; by default the paper's, decreasing in Eq. 4's objective) or the OTPrune gamma
of the rows, and is written only when the runs hold it. Cross-task averages, pooled statistics and
the Wilcoxon pairs read the paper's 11 metrics only (`headlines.aggregated_tasks`: never an extra
column such as MME cognition).

- Fig. 2 (`fig2`): per model, kept ratio and layer, exactly the paper's five strategies (First-K,
  Last-K, Uniform, DivPrune, Random; others in the folder are left out, missing ones named):
  Spearman's rho between the rank of the mean OT distance (closest = 1) and the rank of the task
  score (best = 1), per task and pooled over the tasks (the within-task ranks put together); one
  scatter panel per task and one pooled, rho and p in each panel's title.
- Fig. 3 / 4 (`fig34`): per model and method over the kept ratios, the relative performance
  (pruned / original, %) per task and averaged, the absolute score per task beside the unpruned
  model's, and the OT distance relative to OTPrune's (default gamma) at the same model, ratio and
  layer, per task and averaged. A panel with one method at one ratio compares nothing: it is not
  drawn, and the Fig. 3 table says so.
- Fig. 5 (`fig5`): OTPrune's rows of each model over gamma (at least two gammas): per task score
  and the mean relative performance (%).
- The Wilcoxon test (`wilcoxon`): the paper's protocol (Sec. 5.2): a pair of methods (default
  OTPrune vs DivPrune), one setting (default Table 1's: kept ratio 0.098, layer 0), per model the
  relative % improvement of each of the 11 metrics, one-sided signed-rank test that the median
  improvement is > 0; "all models" pools the models at that one setting. Every other ratio / layer
  the runs hold is a separate test, labelled as such.

`write_figures` writes `<stem>_<name>.md`, `.csv` and `.png` (matplotlib, Agg) beside the report.
Methods keep one colour and marker in every figure (`styles`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from otprune.distance import KIND_LABELS
from otprune.eval import atomic
from otprune.eval.records import setting_defaults
from otprune.eval.report.headlines import HEADLINES, aggregated_tasks
from otprune.eval.report.rows import Report, Row, model_label, row_label
from otprune.eval.report.scores import relative_percent
from otprune.eval.report.stats_tests import relative_improvement, spearman, wilcoxon_greater
from otprune.eval.report.styles import draw_order, marker_size, overlap_label, style

REFERENCE = "otprune"  # Fig. 4 normalises every method's distance by OTPrune's
DEFAULT_PAIR = ("otprune", "divprune")
TABLE1_SETTING = (0.098, 0)  # (kept ratio, layer) of the paper's Table 1 and its Wilcoxon test
FIG2_METHODS = ("first_k", "last_k", "uniform", "divprune", "random")  # the paper's Fig. 2, exactly
PAPER_WILCOXON = (
    "The paper (Sec. 5.2) reports p = 0.028 for OTPrune vs DivPrune without saying which model(s) and setting its "
    "metrics come from; the same protocol on its own Table 1 (LLaVA-1.5-7B, r = 0.098, 11 metrics) gives p = 0.160, "
    "so 0.028 is not a reference value for any single test here."
)


@dataclasses.dataclass
class Table:
    """One artefact's table: a title, column headers, rows of cells (already formatted text)."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        from tabulate import tabulate

        body = tabulate(self.rows, headers=self.headers, tablefmt="pipe", disable_numparse=True)
        return f"### {self.title}\n\n{body}\n" + (f"\n{self.note}\n" if self.note else "")

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.headers)
        writer.writerows(self.rows)
        return buffer.getvalue()


def _num(value: float | str | None, digits: int = 4) -> str:
    """A number to `digits` significant digits; an adaptive ratio ("iqr") as it is."""
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{value:.{digits}g}"


def _stat(value: float | None) -> str:
    return "n/a" if value is None else _num(value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _default_params(row: Row) -> bool:
    """True when every method parameter and the order are the method's defaults."""
    defaults = setting_defaults(row.method)
    return all(value is None or value == defaults.get(name) for name, value in row.params.items()) and (
        row.order in (None, defaults["order"]))


def task_label(task: str) -> str:
    return HEADLINES[task].label if task in HEADLINES else task


def distance_note(report: Report) -> str:
    """Which distance the records hold (OTPRUNE_DISTANCE), and a warning when runs mix kinds."""
    kinds = sorted({k for row in report.rows for b in row.buckets.values() for k in b.get("distance_kinds", ()) if k})
    text = "; ".join(f"{k} = {KIND_LABELS.get(k, k)}" for k in kinds) or "none"
    mixed = " -- MIXED kinds: compare runs of one OTPRUNE_DISTANCE only" if len(kinds) > 1 else ""
    return (f"OT distance (records' `distance_kind`): {text}{mixed}. Per-image distances are averaged once per document "
            "(a multiple-choice document's options share its image).")


def _originals(report: Report) -> dict[str, Row]:
    return {row.model: row for row in report.rows if row.method is None}


def _not_aggregated(report: Report) -> str:
    shown = [t for t in report.tasks if t not in aggregated_tasks(report.tasks)]
    return (" Averages over: " + ", ".join(task_label(t) for t in aggregated_tasks(report.tasks))
            + (f" (not {', '.join(task_label(t) for t in shown)})." if shown else "."))


# ----------------------------------------------------------------------------- Fig. 2


@dataclasses.dataclass
class RankPanel:
    """One Fig. 2 panel: a task (or "pooled"), its Spearman result and its points
    (method, label, distance rank, score rank, task)."""

    task: str
    n: int
    rho: float | None
    p: float | None
    points: list[tuple[str, str, float, float, str]]


def fig2_groups(report: Report) -> dict[tuple, list[Row]]:
    """(model, ratio, layer) -> its rows of the paper's five strategies (`FIG2_METHODS`) with
    distances at the method defaults, when >= 3 of them."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in report.rows:
        if (row.method in FIG2_METHODS and isinstance(row.ratio, (int, float)) and row.distance() is not None
                and _default_params(row)):
            groups[(row.model, row.ratio, row.layer)].append(row)
    return {key: rows for key, rows in groups.items() if len(rows) >= 3}


def _ranks(values: Sequence[float], descending: bool = False) -> list[float]:
    from scipy.stats import rankdata

    return [float(r) for r in rankdata([-v for v in values] if descending else list(values))]


def _fig2_coverage(report: Report, key: tuple, rows: list[Row]) -> str:
    from otprune.config import display_name

    model, ratio, layer = key
    have = {row.method for row in rows}
    missing = [display_name(m) for m in FIG2_METHODS if m not in have]
    others = sorted({row_label(row) for row in report.rows if row.model == model and row.ratio == ratio
                     and row.layer == layer and row.pruned and row not in rows})
    text = f"{model_label(model)} r={_num(ratio)} layer {layer}: " + (
        f"missing {', '.join(missing)}" if missing else "all five strategies")
    return text + (f"; left out (not in the paper's Fig. 2): {', '.join(others)}" if others else "")


def fig2(report: Report) -> tuple[Table, dict] | None:
    """The Fig. 2 table (rho, p per task and pooled) and its panels per group; None without a group."""
    groups = fig2_groups(report)
    if not groups:
        return None
    used = aggregated_tasks(report.tasks)
    cells, panels, coverage = [], {}, []
    for key, rows in groups.items():
        model, ratio, layer = key
        pooled_d, pooled_s, pooled_points, group_panels = [], [], [], []
        for task in used:
            have = [(row, row.task_distance(task), row.scores[task]) for row in rows
                    if task in row.scores and row.task_distance(task) is not None]
            if len(have) < 3:
                continue
            dists, scores = [d for _, d, _ in have], [s for _, _, s in have]
            result = spearman(dists, scores)
            cells.append([model_label(model), _num(ratio), str(layer), task, str(result.n), _stat(result.rho), _stat(result.p)])
            d_rank, s_rank = _ranks(dists), _ranks(scores, descending=True)
            pooled_d += d_rank
            pooled_s += s_rank
            points = [(row.method, row_label(row), d, s, task) for (row, _, _), d, s in zip(have, d_rank, s_rank, strict=True)]
            pooled_points += points
            group_panels.append(RankPanel(task, result.n, result.rho, result.p, points))
        if pooled_d:
            # ranks already point the same way (1 = closest / best): correlate them directly
            result = spearman(pooled_d, [-s for s in pooled_s])
            cells.append([model_label(model), _num(ratio), str(layer), "pooled", str(result.n), _stat(result.rho),
                          _stat(result.p)])
            panels[key] = [*group_panels, RankPanel("pooled", result.n, result.rho, result.p, pooled_points)]
            coverage.append(_fig2_coverage(report, key, rows))
    if not cells:
        return None
    table = Table("Fig. 2: Spearman correlation of OT-distance rank and task-score rank",
                  ["model", "kept ratio", "layer", "task", "methods", "rho", "p (two-sided)"], cells,
                  "The paper's five strategies only (First-K, Last-K, Uniform, DivPrune, Random): "
                  + "; ".join(coverage) + ". rho > 0: the strategies whose kept tokens are closer (OT distance) "
                  "score better. Pooled: the within-task ranks of the aggregated metrics together."
                  + _not_aggregated(report) + " n/a: a ranking is constant (e.g. every method has the same score), "
                  "so rho is not defined. " + distance_note(report))
    return table, panels


def draw_fig2(panels: dict):
    """The Fig. 2 figure: per group one row of panels (each task, then pooled); returns it."""
    pyplot = _pyplot()
    width = max(len(group) for group in panels.values())
    figure, axes = pyplot.subplots(len(panels), width, figsize=(3.6 * width, 3.6 * len(panels)), dpi=110,
                                   squeeze=False)
    for ax_row, ((model, ratio, layer), group) in zip(axes, panels.items(), strict=True):
        numbers = {panel.task: i + 1 for i, panel in enumerate(group) if panel.task != "pooled"}
        for ax, panel in zip(ax_row, group, strict=False):
            by_method: dict[str, list] = defaultdict(list)
            labels = {}
            for method, label, d, s, task in panel.points:
                by_method[method].append((d, s, task))
                labels[method] = label
            for method in draw_order(by_method):
                look = style(method)
                values = by_method[method]
                ax.scatter([d for d, _, _ in values], [s for _, s, _ in values], label=labels[method],
                           marker=look.marker, facecolors="none", edgecolors=look.colour,
                           s=marker_size(method) ** 2, linewidths=1.5, zorder=3)
                if panel.task == "pooled":  # tasks told apart by their number (the title's key)
                    at: dict[tuple, list[str]] = defaultdict(list)
                    for d, s, task in values:
                        at[(d, s)].append(str(numbers[task]))
                    for (d, s), which in at.items():
                        ax.annotate(",".join(which), (d, s), fontsize=6, color=look.colour,
                                    xytext=(4, 4), textcoords="offset points")
            name = "pooled over tasks" if panel.task == "pooled" else task_label(panel.task)
            title = f"{name}\nrho = {_stat(panel.rho)}, p = {_stat(panel.p)} (n = {panel.n})"
            if panel.task == "pooled":
                title += "\n" + ", ".join(f"{n} = {task_label(t)}" for t, n in numbers.items())
            ax.set_title(title, fontsize=7 if panel.task == "pooled" else 8)
            ax.set_xlabel("OT-distance rank (1 = closest)")
            ax.set_ylabel("task-score rank (1 = best)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
        for ax in ax_row[len(group):]:
            ax.set_visible(False)
        ax_row[0].annotate(f"{model_label(model)}, kept ratio {_num(ratio)}, layer {layer}", (0, 1.25),
                           xycoords="axes fraction", fontsize=9, weight="bold")
    return figure


def plot_fig2(panels: dict, path: Path) -> None:
    _save(draw_fig2(panels), path)


# ----------------------------------------------------------------------------- Fig. 3 / 4


@dataclasses.dataclass
class Series:
    """One method's line in a Fig. 3 / 4 panel: per kept ratio, the mean relative performance (%),
    the mean distance relative to OTPrune's, and the absolute score per task."""

    method: str
    label: str
    points: list[tuple[float, float | None, float | None, dict[str, float]]] = dataclasses.field(default_factory=list)


def fig34(report: Report) -> tuple[Table, Table | None, dict] | None:
    """(Fig. 3 table, Fig. 4 table, panels): relative performance, absolute scores and relative OT
    distance per method over the kept ratios; None without an unpruned row and pruned rows of
    its model; the Fig. 4 table is None when no row has a distance relative to an OTPrune row.
    panels: (model, layer) -> {"series": {label: Series}, "unpruned": {task: score},
    "tasks": [...], "drawn": bool} (drawn: more than one method or more than one ratio)."""
    originals = _originals(report)
    lines: dict[tuple, list[Row]] = defaultdict(list)
    for row in report.rows:
        if row.pruned and isinstance(row.ratio, (int, float)) and row.model in originals:
            lines[(row.model, row_label(row), row.layer)].append(row)
    if not lines:
        return None
    used = aggregated_tasks(report.tasks)
    reference = {(row.model, row.ratio, row.layer): row for row in report.rows
                 if row.method == REFERENCE and _default_params(row) and isinstance(row.ratio, (int, float))}
    perf_cells, dist_cells, panels, unusable = [], [], {}, set()
    for (model, label, layer), rows in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or 0)):
        base = originals[model]
        panel = panels.setdefault((model, layer), {"series": {}, "unpruned": dict(base.scores), "tasks": list(report.tasks)})
        series = panel["series"].setdefault(label, Series(rows[0].method, label))
        for row in sorted(rows, key=lambda r: r.ratio):
            rel = {t: v for t in report.tasks if (v := relative_percent(row, base, t)) is not None}
            avg = _mean([rel[t] for t in used if t in rel])
            perf_cells.append([model_label(model), label, str(layer), _num(row.ratio)]
                              + [_num(rel.get(t)) for t in report.tasks] + [_num(avg)])
            ref = reference.get((model, row.ratio, row.layer))
            rel_d = {}
            if ref is not None:
                for t in report.tasks:
                    mine, theirs = row.task_distance(t), ref.task_distance(t)
                    if mine is not None and theirs is not None:
                        if theirs > 0:
                            rel_d[t] = mine / theirs
                        else:
                            unusable.add(f"{model_label(model)} r={_num(row.ratio)} {task_label(t)}")
            avg_d = _mean([rel_d[t] for t in used if t in rel_d])
            dist_cells.append([model_label(model), label, str(layer), _num(row.ratio)]
                              + [_num(rel_d.get(t)) for t in report.tasks] + [_num(avg_d)])
            series.points.append((row.ratio, avg, avg_d, {t: row.scores[t] for t in report.tasks if t in row.scores}))
    not_drawn = []
    for (model, layer), panel in panels.items():
        panel["drawn"] = len(panel["series"]) > 1 or any(len(s.points) > 1 for s in panel["series"].values())
        if not panel["drawn"]:
            only = next(iter(panel["series"].values()))
            not_drawn.append(f"{model_label(model)} layer {layer}: only {only.label} at kept ratio "
                             f"{only.points[0][0]:g}, no comparison to draw")
    headers = ["model", "method", "layer", "kept ratio", *report.tasks, "average"]
    perf = Table("Fig. 3: relative performance (pruned / original, %) over kept ratios", headers, perf_cells,
                 "Per task the pruned score over the unpruned model's, in %; average = mean over the aggregated metrics "
                 "(the paper's 11 when the runs hold them; empty cells: the unpruned score is 0 or missing)."
                 + _not_aggregated(report) + (" Not drawn: " + "; ".join(not_drawn) + "." if not_drawn else ""))
    dist = Table("Fig. 4: OT distance relative to OTPrune's (method / OTPrune, same model, ratio, layer)", headers,
                 dist_cells, "Mean per-image distance of the kept tokens (records' `distance`) over OTPrune's at "
                 "its default gamma; > 1: farther from the full token set than OTPrune." + _not_aggregated(report)
                 + (" Not defined where OTPrune's distance is <= 0 (its f exceeds Tr Sigma): "
                    + ", ".join(sorted(unusable)) + "." if unusable else "") + " " + distance_note(report))
    if all(cell == "" for row in dist_cells for cell in row[4:]):
        dist = None
    return perf, dist, panels


def _task_unit(task: str) -> str:
    """The axis label of a task's absolute score: its headline label and unit."""
    known = HEADLINES.get(task)
    return f"{task} (as lmms-eval reports it)" if known is None else f"{known.label} ({known.unit})"


def _line(ax, series: Series, xs: list[float], ys: list[float], drawn: dict) -> None:
    look = style(series.method)
    pts = list(zip(xs, ys, strict=True))
    ax.plot(xs, ys, label=overlap_label(series.label, pts, drawn), color=look.colour, marker=look.marker,
            linestyle=look.linestyle, markerfacecolor="none", markersize=marker_size(series.method), linewidth=1.4)


def draw_fig34(panels: dict):
    """The Fig. 3 / 4 figure: per (model, layer) with a comparison, the relative performance (%),
    the relative OT distance and one absolute panel per task; returns it, or None when no panel
    has a comparison."""
    shown = {key: panel for key, panel in panels.items() if panel.get("drawn", True)}
    if not shown:
        return None
    pyplot = _pyplot()
    columns = 3
    layout = [(key, kind, task) for key, panel in sorted(shown.items(), key=str)
              for kind, task in [("relative", None), ("distance", None)] + [("absolute", t) for t in panel["tasks"]]]
    rows_per_group = {key: math.ceil((2 + len(panel["tasks"])) / columns) for key, panel in shown.items()}
    total_rows = sum(rows_per_group.values())
    figure, axes = pyplot.subplots(total_rows, columns, figsize=(4.4 * columns, 3.4 * total_rows), dpi=110,
                                   squeeze=False)
    flat, start = [], 0
    for key in sorted(shown, key=str):
        cells = [ax for row in axes[start:start + rows_per_group[key]] for ax in row]
        n = 2 + len(shown[key]["tasks"])
        flat += cells[:n]
        for ax in cells[n:]:
            ax.set_visible(False)
        start += rows_per_group[key]
    for ax, (key, kind, task) in zip(flat, layout, strict=True):
        model, layer = key
        panel = shown[key]
        drawn: dict = {}
        for label in draw_order_labels(panel["series"]):
            series = panel["series"][label]
            pts = sorted(series.points, key=lambda p: p[0])
            if kind == "relative":
                got = [(100 * r, a) for r, a, _, _ in pts if a is not None]
            elif kind == "distance":
                got = [(100 * r, d) for r, _, d, _ in pts if d is not None]
            else:
                got = [(100 * r, s[task]) for r, _, _, s in pts if task in s]
            if got:
                _line(ax, series, [x for x, _ in got], [y for _, y in got], drawn)
        where = f"{model_label(model)} (layer {layer})"
        if kind == "relative":
            ax.axhline(100.0, color="black", linestyle="--", linewidth=1, label="unpruned (100%)")
            ax.set_title(f"{where}: relative performance, mean over tasks", fontsize=8)
            ax.set_ylabel("score relative to unpruned (%)")
        elif kind == "distance":
            ax.axhline(1.0, color=style(REFERENCE).colour, linestyle=":", linewidth=1)
            ax.set_title(f"{where}: OT distance / OTPrune's, mean over tasks", fontsize=8)
            ax.set_ylabel("OT distance / OTPrune's (ratio, OTPrune = 1)")
            if not drawn:
                ax.text(0.5, 0.5, "no distance relative to OTPrune\n(no OTPrune row with distances)",
                        ha="center", va="center", transform=ax.transAxes, fontsize=8)
        else:
            if task in panel["unpruned"]:
                ax.axhline(panel["unpruned"][task], color="black", linestyle="--", linewidth=1, label="unpruned")
            ax.set_title(f"{where}: {task_label(task)}", fontsize=8)
            ax.set_ylabel(_task_unit(task))
        ax.set_xlabel("kept visual tokens (% of the image's tokens)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return figure


def draw_order_labels(series: dict[str, Series]) -> list[str]:
    """Series labels in the methods' drawing order (`styles.draw_order`), variants after their method."""
    methods = draw_order({s.method for s in series.values()})
    return sorted(series, key=lambda label: (methods.index(series[label].method), label))


def plot_fig34(panels: dict, path: Path) -> bool:
    figure = draw_fig34(panels)
    if figure is None:
        return False
    _save(figure, path)
    return True


# ----------------------------------------------------------------------------- Fig. 5


def fig5(report: Report) -> tuple[Table, dict] | None:
    """OTPrune over gamma per model (and ratio, layer); None unless some model has >= 2 gammas."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in report.rows:
        if row.method == REFERENCE and row.params.get("gamma") is not None:
            groups[(row.model, row.ratio, row.layer)].append(row)
    groups = {key: rows for key, rows in groups.items() if len({row.params["gamma"] for row in rows}) >= 2}
    if not groups:
        return None
    cells, curves = [], {}
    for (model, ratio, layer), rows in sorted(groups.items(), key=str):
        rows = sorted(rows, key=lambda row: row.params["gamma"])
        for row in rows:
            cells.append([model_label(model), _num(ratio), str(layer), _num(row.params["gamma"])]
                         + [_num(row.scores.get(t)) for t in report.tasks] + [_num(row.relative)])
        curves[(model, ratio, layer)] = [(row.params["gamma"], row.relative) for row in rows]
    table = Table("Fig. 5: sensitivity to gamma (OTPrune)",
                  ["model", "kept ratio", "layer", "gamma", *report.tasks, "relative (%)"], cells,
                  "relative: mean over the aggregated metrics of the score / the unpruned model's, in % (empty without an "
                  "unpruned row)." + _not_aggregated(report))
    return table, curves


LINESTYLES = ("-", "--", "-.", ":")


def draw_fig5(curves: dict):
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=110)
    look = style(REFERENCE)
    drawn: dict = {}
    for index, ((model, ratio, layer), values) in enumerate(curves.items()):
        shown = [(g, r) for g, r in values if r is not None]
        if shown:
            label = overlap_label(f"OTPrune, {model_label(model)} r={_num(ratio)} L{layer}", shown, drawn)
            axes.plot([g for g, _ in shown], [r for _, r in shown], color=look.colour, marker=look.marker,
                      markerfacecolor="none", markersize=marker_size(REFERENCE) - 2 * index,
                      linestyle=LINESTYLES[index % len(LINESTYLES)], label=label)
    axes.axhline(100.0, color="black", linestyle="--", linewidth=1, label="unpruned (100%)")
    axes.set_xscale("log")
    axes.set_xlabel("gamma (OTPrune's kernel scale, dimensionless; log axis)")
    axes.set_ylabel("score relative to unpruned (%)")
    axes.set_title("OTPrune: sensitivity to gamma (mean over tasks)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def plot_fig5(curves: dict, path: Path) -> None:
    _save(draw_fig5(curves), path)


# ----------------------------------------------------------------------------- Wilcoxon


def _same_setting(ratio, layer, setting: tuple[float, int]) -> bool:
    return isinstance(ratio, (int, float)) and math.isclose(ratio, setting[0], abs_tol=1e-9) and (layer or 0) == setting[1]


def wilcoxon(report: Report, pair: tuple[str, str] = DEFAULT_PAIR,
             setting: tuple[float, int] = TABLE1_SETTING) -> Table | None:
    """One-sided Wilcoxon signed-rank tests of `pair[0]` over `pair[1]` (module docstring): at
    each (kept ratio, layer) where both have default-parameter rows, one test per model and one
    pooling the models of that setting; `setting` (Table 1's by default) first, every other one a
    separate, labelled test. None when no setting has both methods with a common metric."""
    method, baseline = pair
    used = aggregated_tasks(report.tasks)
    rows = {(row.model, row.ratio, row.layer, row.method): row for row in report.rows
            if row.method in pair and _default_params(row)}
    diffs: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (model, ratio, layer, name), row in rows.items():
        other = rows.get((model, ratio, layer, baseline)) if name == method else None
        if other is None:
            continue
        for task in used:
            if task in row.scores and other.scores.get(task) not in (None, 0):
                diffs[(ratio, layer)][model].append(relative_improvement(row.scores[task], other.scores[task]))
    if not diffs:
        return None
    from otprune.config import display_name

    title = f"{display_name(method)} vs {display_name(baseline)}"
    order = sorted(diffs, key=lambda key: (not _same_setting(*key, setting), str(key)))
    cells = []
    for ratio, layer in order:
        label = (f"r={ratio if isinstance(ratio, str) else f'{ratio:g}'}, layer {layer}"
                 + (" (the test's setting)" if _same_setting(ratio, layer, setting) else " (another setting: a separate test)"))
        per_model = diffs[(ratio, layer)]
        scopes = [(model_label(m), vs) for m, vs in sorted(per_model.items())]
        if len(per_model) > 1:
            scopes.append((f"all models ({len(per_model)}) at this setting", [v for vs in per_model.values() for v in vs]))
        for scope, values in scopes:
            result = wilcoxon_greater(values)
            cells.append([title, label, scope, str(result.n), _num(result.median), _num(result.statistic), _num(result.p)])
    missing = "" if any(_same_setting(*key, setting) for key in diffs) else (
        f" No runs at the test's setting (r={setting[0]:g}, layer {setting[1]}): only separate tests at other settings.")
    return Table(f"Wilcoxon signed-rank test: {title} (one-sided, greater)",
                 ["comparison", "setting", "scope", "metrics", "median improvement (%)", "W+", "p"], cells,
                 f"Protocol (paper, Sec. 5.2): at one setting (kept ratio {setting[0]:g}, layer {setting[1]}: Table 1's "
                 "unless named), the relative % improvement of each of the paper's metrics over the baseline, per "
                 "model; H1: the median improvement is > 0. 'all models' pools the models at that setting only."
                 + _not_aggregated(report) + missing + " " + PAPER_WILCOXON)


# ----------------------------------------------------------------------------- output


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    """Through the one writer (`otprune.eval.atomic`): random temporary name, never through a link."""
    figure.tight_layout()
    try:
        with atomic.replacing(path) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        _pyplot().close(figure)


def _write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def write_figures(report: Report, folder: str | os.PathLike, stem: str = "otprune_report",
                  pair: tuple[str, str] = DEFAULT_PAIR, setting: tuple[float, int] = TABLE1_SETTING) -> dict[str, Path]:
    """Write every analysis the runs hold: `<stem>_fig2.{md,csv,png}`, `_fig3`, `_fig4`
    (`_fig34.png`, only when some panel compares something), `_fig5.{md,csv,png}`,
    `_wilcoxon.{md,csv}` (tests at `setting`, then the others). Returns {artefact: path}."""
    folder = Path(folder)
    written: dict[str, Path] = {}

    def tables(name: str, *items: Table) -> None:
        _write_text(folder / f"{stem}_{name}.md", "\n".join(t.markdown() for t in items))
        _write_text(folder / f"{stem}_{name}.csv", "\n".join(t.csv() for t in items))
        written[f"{name}_md"], written[f"{name}_csv"] = folder / f"{stem}_{name}.md", folder / f"{stem}_{name}.csv"

    if (found := fig2(report)) is not None:
        tables("fig2", found[0])
        plot_fig2(found[1], folder / f"{stem}_fig2.png")
        written["fig2_png"] = folder / f"{stem}_fig2.png"
    if (found := fig34(report)) is not None:
        tables("fig3", found[0])
        if found[1] is not None:
            tables("fig4", found[1])
        if plot_fig34(found[2], folder / f"{stem}_fig34.png"):
            written["fig34_png"] = folder / f"{stem}_fig34.png"
    if (found := fig5(report)) is not None:
        tables("fig5", found[0])
        plot_fig5(found[1], folder / f"{stem}_fig5.png")
        written["fig5_png"] = folder / f"{stem}_fig5.png"
    if (found := wilcoxon(report, pair, setting)) is not None:
        tables("wilcoxon", found)
    return written
