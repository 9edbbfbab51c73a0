"""Scores computed across rows: the average rank among comparable pruned rows, and the score
relative to the unpruned model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from otprune.eval.report.rows import Row


def average_ranks(rows: Sequence[Row], tasks: Sequence[str]) -> None:
    """Set `Row.rank`: per task, the rank (1 = best, ties share the mean rank) among the pruned rows
    of the same model and kept ratio, averaged over tasks."""
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


def relative_scores(rows: Sequence[Row], tasks: Sequence[str]) -> None:
    """Set `Row.relative` of pruned rows: the mean over tasks of score / unpruned score of the same
    model, in %."""
    originals = {row.model: row for row in rows if row.method is None}
    for row in rows:
        base = originals.get(row.model)
        if base is None or not row.pruned:
            continue
        values = [
            100.0 * row.scores[task] / base.scores[task]
            for task in tasks
            if task in row.scores and base.scores.get(task) not in (None, 0)
        ]
        row.relative = sum(values) / len(values) if values else None
