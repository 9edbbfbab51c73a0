"""Scores computed across rows: the average rank among comparable pruned rows, and the score
relative to the unpruned model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from otprune.eval.report.rows import Row, row_label


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


def relative_scores(rows: Sequence[Row], tasks: Sequence[str]) -> list[str]:
    """Set `Row.relative` of pruned rows: the mean over tasks of score / unpruned score, in %, against
    the unpruned row of the same label (`label_models`: the same model, engine, arguments and scope:
    limit and lmms-eval version). Returns notes: a pruned row whose model has an unpruned row only in
    another scope gets no relative score, and says so; a task whose unpruned score is 0 is left out."""
    notes = []
    originals = {row.model: row for row in rows if row.method is None}
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
        zero = [task for task in tasks if task in row.scores and base.scores.get(task) == 0]
        values = [
            100.0 * row.scores[task] / base.scores[task]
            for task in tasks
            if task in row.scores and base.scores.get(task) not in (None, 0)
        ]
        row.relative = sum(values) / len(values) if values else None
        if zero:
            notes.append(f"{row.model} / {row_label(row)}: relative score leaves out {', '.join(zero)} "
                         "(unpruned score 0)")
    return notes
