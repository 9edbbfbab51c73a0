"""Scores computed across rows: the average rank among comparable pruned rows, and the score
relative to the unpruned model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from otprune.eval.report.headlines import aggregated_tasks, aggregation_note
from otprune.eval.report.rows import Row, model_label, row_label


def average_ranks(rows: Sequence[Row], tasks: Sequence[str]) -> None:
    """Set `Row.rank`: per task, the rank (1 = best, ties share the mean rank) among the pruned rows
    of the same model and kept ratio, averaged over the aggregated tasks (`aggregated_tasks`)."""
    tasks = aggregated_tasks(tasks)
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        if row.pruned:
            groups[(row.model, row.ratio)].append(row)
    for members in groups.values():
        if len(members) < 2:
            continue
        ranks: dict[int, list[float]] = defaultdict(list)
        for task in tasks:
            scored = [(index, row.scores[task]) for index, row in enumerate(members) if task in row.scores]
            if len(scored) < 2:
                continue
            lower = any(task in row.lower_is_better for row in members)
            for index, value in scored:
                better = sum(1 for _, other in scored if (other < value if lower else other > value))
                ties = sum(1 for _, other in scored if other == value)
                ranks[index].append(better + (ties + 1) / 2)
        for index, row in enumerate(members):
            if ranks[index]:
                row.rank = sum(ranks[index]) / len(ranks[index])


def relative_scores(rows: Sequence[Row], tasks: Sequence[str]) -> list[str]:
    """Set `Row.relative` of pruned rows: the mean over the aggregated tasks (`aggregated_tasks`)
    of score / unpruned score, in %, against the unpruned row of the same label (`label_models`:
    the same model, engine, arguments and scope: limit and lmms-eval version). Returns the notes for
    the table: which columns were aggregated when some column is not, each task left out of a row's
    mean because the unpruned score is 0 (or missing), and each pruned row whose model has an
    unpruned row only in another scope (no relative score)."""
    used = aggregated_tasks(tasks)
    notes = [aggregation_note(tasks)] if list(tasks) != used else []
    originals = {row.model: row for row in rows if row.method is None}
    zero: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if not row.pruned:
            continue
        base = originals.get(row.model)
        if base is None:
            others = [other.model for other in originals.values()
                      if row.spec is not None and other.spec is not None and other.spec.model == row.spec.model]  # fmt: skip
            if others:
                row.relative_note = f"no unpruned run in its scope; not compared with {', '.join(sorted(others))}"
                notes.append(f"{row.model} / {row_label(row)}: {row.relative_note}")
            continue
        values = []
        for task in used:
            if task not in row.scores:
                continue
            if base.scores.get(task) in (None, 0):
                zero[model_label(row.model)].add(task)
                continue
            values.append(100.0 * row.scores[task] / base.scores[task])
        row.relative = sum(values) / len(values) if values else None
    for model, left_out in sorted(zero.items()):
        notes.append(f"{model}: relative scores leave out {', '.join(sorted(left_out))}: the unpruned score is 0 or "
                     "missing, so pruned / unpruned is not defined")
    return notes


def relative_percent(row: Row, base: Row | None, task: str) -> float | None:
    """100 x row's score / the unpruned row's on `task`; None when either is missing or the
    unpruned score is 0."""
    if base is None or task not in row.scores or base.scores.get(task) in (None, 0):
        return None
    return 100.0 * row.scores[task] / base.scores[task]
