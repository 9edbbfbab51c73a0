"""The paper's analyses beyond Table 1, from the same rows (issue #16 point 2).

Each needs the per-image distance of the kept tokens that records carry (`otprune.distance`,
`OTPRUNE_DISTANCE`) or the OTPrune gamma of the rows, and is written only when the runs hold it:

- Fig. 2 (`fig2`): per group of pruned rows of one model, kept ratio and layer (the strategies:
  First-K, Last-K, Uniform, Random, DivPrune, ...), Spearman's rho between the rank of the mean OT
  distance (closest = 1) and the rank of the task score (best = 1), per task and pooled over the
  tasks (the within-task ranks put together); scatter of the two ranks.
- Fig. 3 / 4 (`fig34`): per model and method over the kept ratios, the relative performance
  pruned / original per task and averaged over the tasks, and the OT distance relative to
  OTPrune's (default gamma) at the same model, ratio and layer, per task and averaged.
- Fig. 5 (`fig5`): OTPrune's rows of each model over gamma (at least two gammas): per task score
  and the mean relative performance.
- The Wilcoxon test (`wilcoxon`): a pair of methods (default OTPrune vs DivPrune) at the same
  model, ratio and layer; the relative % improvement of every task metric; one-sided signed-rank
  test that the median improvement is > 0, pooled over every model and per model.

`write_figures` writes `<stem>_<name>.md`, `.csv` and `.png` (matplotlib, Agg) beside the report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from otprune.eval import atomic
from otprune.eval.records import setting_defaults
from otprune.eval.report.rows import Report, Row, model_label, row_label
from otprune.eval.report.stats_tests import relative_improvement, spearman, wilcoxon_greater

REFERENCE = "otprune"  # Fig. 4 normalises every method's distance by OTPrune's
DEFAULT_PAIR = ("otprune", "divprune")


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


KIND_TEXT = {"trace": "trace = the closed-form W2 of the Gaussian fits, from the paper's Eq. 4",
             "w2": "w2 = the exact empirical W2 (POT)"}


def distance_note(report: Report) -> str:
    """Which distance the records hold (OTPRUNE_DISTANCE), and a warning when runs mix kinds."""
    kinds = sorted({k for row in report.rows for b in row.buckets.values() for k in b.get("distance_kinds", ()) if k})
    text = "; ".join(KIND_TEXT.get(k, k) for k in kinds) or "none"
    mixed = " -- MIXED kinds: compare runs of one OTPRUNE_DISTANCE only" if len(kinds) > 1 else ""
    return f"OT distance (records' `distance_kind`): {text}{mixed}."


def _originals(report: Report) -> dict[str, Row]:
    return {row.model: row for row in report.rows if row.method is None}


# ----------------------------------------------------------------------------- Fig. 2


def fig2_groups(report: Report) -> dict[tuple, list[Row]]:
    """(model, ratio, layer) -> its pruned rows with distances at the method defaults, when >= 3."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in report.rows:
        if row.pruned and isinstance(row.ratio, (int, float)) and row.distance() is not None and _default_params(row):
            groups[(row.model, row.ratio, row.layer)].append(row)
    return {key: rows for key, rows in groups.items() if len(rows) >= 3}


def _ranks(values: Sequence[float], descending: bool = False) -> list[float]:
    from scipy.stats import rankdata

    return [float(r) for r in rankdata([-v for v in values] if descending else list(values))]


def fig2(report: Report) -> tuple[Table, dict] | None:
    """The Fig. 2 table (rho, p per task and pooled) and the scatter's points; None without a group."""
    groups = fig2_groups(report)
    if not groups:
        return None
    cells, points = [], {}
    for (model, ratio, layer), rows in groups.items():
        pooled_d, pooled_s, scatter = [], [], []
        for task in report.tasks:
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
            scatter += [(row_label(row), d, s) for (row, _, _), d, s in zip(have, d_rank, s_rank, strict=True)]
        if pooled_d:
            # ranks already point the same way (1 = closest / best): correlate them directly
            result = spearman(pooled_d, [-s for s in pooled_s])
            cells.append([model_label(model), _num(ratio), str(layer), "pooled", str(result.n), _stat(result.rho),
                          _stat(result.p)])
            points[(model, ratio, layer)] = scatter
    if not cells:
        return None
    table = Table("Fig. 2: Spearman correlation of OT-distance rank and task-score rank",
                  ["model", "kept ratio", "layer", "task", "methods", "rho", "p (two-sided)"], cells,
                  "rho > 0: the strategies whose kept tokens are closer (OT distance) score better. "
                  "Pooled: the within-task ranks of every task together. n/a: a ranking is constant (e.g. every "
                  "method has the same score), so rho is not defined. " + distance_note(report))
    return table, points


def plot_fig2(points: dict, path: Path) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(1, len(points), figsize=(4.6 * len(points), 4.0), dpi=120, squeeze=False)
    for ax, ((model, ratio, layer), scatter) in zip(axes[0], points.items(), strict=True):
        by_method = defaultdict(list)
        for label, d, s in scatter:
            by_method[label].append((d, s))
        for label, values in sorted(by_method.items()):
            ax.scatter([d for d, _ in values], [s for _, s in values], label=label, alpha=0.8)
        ax.set_xlabel("OT-distance rank (1 = closest)")
        ax.set_ylabel("task-score rank (1 = best)")
        ax.set_title(f"{model_label(model)}, r={_num(ratio)}, layer {layer}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(figure, path)


# ----------------------------------------------------------------------------- Fig. 3 / 4


def fig34(report: Report) -> tuple[Table, Table | None, dict] | None:
    """(Fig. 3 table, Fig. 4 table, curves): relative performance and relative OT distance per
    method over the kept ratios; None without an unpruned row and pruned rows of its model; the
    Fig. 4 table is None when no row has a distance relative to an OTPrune row."""
    originals = _originals(report)
    lines: dict[tuple, list[Row]] = defaultdict(list)
    for row in report.rows:
        if row.pruned and isinstance(row.ratio, (int, float)) and row.model in originals:
            lines[(row.model, row_label(row), row.layer)].append(row)
    if not lines:
        return None
    reference = {(row.model, row.ratio, row.layer): row for row in report.rows
                 if row.method == REFERENCE and _default_params(row) and isinstance(row.ratio, (int, float))}
    perf_cells, dist_cells, curves = [], [], defaultdict(dict)
    for (model, label, layer), rows in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or 0)):
        base = originals[model]
        for row in sorted(rows, key=lambda r: r.ratio):
            rel = {t: row.scores[t] / base.scores[t] for t in report.tasks
                   if t in row.scores and base.scores.get(t) not in (None, 0)}
            avg = _mean(list(rel.values()))
            perf_cells.append([model_label(model), label, str(layer), _num(row.ratio)]
                              + [_num(rel.get(t)) for t in report.tasks] + [_num(avg)])
            ref = reference.get((model, row.ratio, row.layer))
            rel_d = {}
            if ref is not None:
                for t in report.tasks:
                    mine, theirs = row.task_distance(t), ref.task_distance(t)
                    if mine is not None and theirs:
                        rel_d[t] = mine / theirs
            avg_d = _mean(list(rel_d.values()))
            dist_cells.append([model_label(model), label, str(layer), _num(row.ratio)]
                              + [_num(rel_d.get(t)) for t in report.tasks] + [_num(avg_d)])
            curves[(model, layer)].setdefault(label, []).append((row.ratio, avg, avg_d))
    headers = ["model", "method", "layer", "kept ratio", *report.tasks, "average"]
    perf = Table("Fig. 3: relative performance (pruned / original) over kept ratios", headers, perf_cells,
                 "Per task the pruned score over the unpruned model's; average = mean over the tasks.")
    dist = Table("Fig. 4: OT distance relative to OTPrune's (method / OTPrune, same model, ratio, layer)", headers,
                 dist_cells, "Mean per-image distance of the kept tokens (records' `distance`) over OTPrune's at "
                 "its default gamma; > 1: farther from the full token set than OTPrune. " + distance_note(report))
    if all(cell == "" for row in dist_cells for cell in row[4:]):
        dist = None
    return perf, dist, curves


def plot_fig34(curves: dict, path: Path) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(len(curves), 2, figsize=(10, 3.8 * len(curves)), dpi=120, squeeze=False)
    for (perf_ax, dist_ax), ((model, layer), methods) in zip(axes, sorted(curves.items(), key=str), strict=True):
        for label, values in sorted(methods.items()):
            values.sort(key=lambda v: v[0])
            perf_ax.plot([100 * r for r, a, _ in values if a is not None], [a for _, a, _ in values if a is not None],
                         marker="o", label=label)
            dist_ax.plot([100 * r for r, _, d in values if d is not None], [d for _, _, d in values if d is not None],
                         marker="o", label=label)
        perf_ax.set_title(f"{model_label(model)} (layer {layer}): relative performance", fontsize=9)
        dist_ax.set_title(f"{model_label(model)} (layer {layer}): OT distance / OTPrune's", fontsize=9)
        for ax in (perf_ax, dist_ax):
            ax.set_xlabel("kept visual tokens (%)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    _save(figure, path)


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
                  "relative: mean over the tasks of the score / the unpruned model's, in % (empty without an "
                  "unpruned row).")
    return table, curves


def plot_fig5(curves: dict, path: Path) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=120)
    for (model, ratio, layer), values in curves.items():
        shown = [(g, r) for g, r in values if r is not None]
        if shown:
            axes.plot([g for g, _ in shown], [r for _, r in shown], marker="o",
                      label=f"{model_label(model)} r={_num(ratio)} L{layer}")
    axes.set_xscale("log")
    axes.set_xlabel("gamma")
    axes.set_ylabel("score relative to unpruned (%)")
    axes.set_title("OTPrune: sensitivity to gamma")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    _save(figure, path)


# ----------------------------------------------------------------------------- Wilcoxon


def wilcoxon(report: Report, pair: tuple[str, str] = DEFAULT_PAIR) -> Table | None:
    """One-sided Wilcoxon signed-rank test of `pair[0]` over `pair[1]` (module docstring); None
    when no model / ratio / layer has both at their default parameters with a common task."""
    method, baseline = pair
    rows = {(row.model, row.ratio, row.layer, row.method): row for row in report.rows
            if row.method in pair and _default_params(row)}
    diffs: dict[str, list[float]] = defaultdict(list)
    for (model, ratio, layer, name), row in rows.items():
        other = rows.get((model, ratio, layer, baseline)) if name == method else None
        if other is None:
            continue
        for task in report.tasks:
            if task in row.scores and other.scores.get(task) not in (None, 0):
                diffs[model].append(relative_improvement(row.scores[task], other.scores[task]))
    if not diffs:
        return None
    from otprune.config import display_name

    title = f"{display_name(method)} vs {display_name(baseline)}"
    cells = []
    for scope, values in [("all models", [v for vs in diffs.values() for v in vs])] + (
            [(model_label(m), vs) for m, vs in sorted(diffs.items())] if len(diffs) > 1 else []):
        result = wilcoxon_greater(values)
        cells.append([title, scope, str(result.n), _num(result.median), _num(result.statistic), _num(result.p)])
    return Table(f"Wilcoxon signed-rank test: {title} (one-sided, greater)",
                 ["comparison", "scope", "metrics", "median improvement (%)", "W+", "p"], cells,
                 "Relative % improvement of every task metric over the baseline at the same model, kept ratio "
                 "and layer; H1: the median improvement is > 0 (paper, Sec. 5.2: OTPrune vs DivPrune, p = 0.028).")


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
                  pair: tuple[str, str] = DEFAULT_PAIR) -> dict[str, Path]:
    """Write every analysis the runs hold: `<stem>_fig2.{md,csv,png}`, `_fig3`, `_fig4`
    (`_fig34.png`), `_fig5.{md,csv,png}`, `_wilcoxon.{md,csv}`. Returns {artefact: path}."""
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
        plot_fig34(found[2], folder / f"{stem}_fig34.png")
        written["fig34_png"] = folder / f"{stem}_fig34.png"
    if (found := fig5(report)) is not None:
        tables("fig5", found[0])
        plot_fig5(found[1], folder / f"{stem}_fig5.png")
        written["fig5_png"] = folder / f"{stem}_fig5.png"
    if (found := wilcoxon(report, pair)) is not None:
        tables("wilcoxon", found)
    return written
