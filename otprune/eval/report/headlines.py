"""Which metric sums up each lmms-eval task in the table (the paper's tasks, ours, and a fallback for
any other task), how it is scaled and printed, and the task columns' order."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Headline:
    """The metric a task is summarised by: lmms-eval metric name, column label, scale, decimals,
    and the unit of the scaled value (figure axes)."""

    metric: str
    label: str
    scale: float = 1.0
    digits: int = 2
    unit: str = "%"


# The paper's 11 tasks (docs/ALGORITHM.md 7, in the paper's column order) and our smoke tasks.
HEADLINES: dict[str, Headline] = {
    "coco2017_cap_val": Headline("coco_CIDEr", "COCO CIDEr", unit="CIDEr"),
    "flickr30k_test": Headline("flickr_CIDEr", "Flickr CIDEr", unit="CIDEr"),
    "gqa": Headline("exact_match", "GQA EM", 100.0),
    "mmbench_en_dev": Headline("gpt_eval_score", "MMB Acc"),  # lmms-eval already reports %
    "mmbench_en_dev_static": Headline("gpt_eval_score", "MMB Acc (static)"),  # no judge: rule-based matching
    "mme": Headline("mme_perception_score", "MME P", 1.0, 0, "points"),  # the paper's MME number: perception
    "mme_cognition": Headline("mme_cognition_score", "MME C", 1.0, 0, "points"),  # lmms-eval's second MME score, beside it
    "mmmu_val": Headline("mmmu_acc", "MMMU Acc", 100.0),
    "nocaps_val": Headline("nocaps_CIDEr", "NoCaps CIDEr", unit="CIDEr"),
    "ok_vqa_val2014": Headline("exact_match", "OKVQA EM", 100.0),
    "pope": Headline("pope_f1_score", "POPE F1", 100.0),
    "scienceqa_img": Headline("exact_match", "SQA EM", 100.0),
    "seedbench": Headline("seed_image", "SEED Acc", 100.0),
    "otprune_smoke_gen": Headline("exact_match", "Smoke EM", 100.0),
    "otprune_smoke_mc": Headline("acc", "Smoke MC Acc", 100.0),
}
PAPER_TASKS = (
    "coco2017_cap_val", "flickr30k_test", "gqa", "mmbench_en_dev", "mme", "mmmu_val", "nocaps_val", "ok_vqa_val2014",
    "pope", "scienceqa_img", "seedbench",
)  # fmt: skip
SMOKE_TASKS = ("otprune_smoke_gen", "otprune_smoke_mc")
# A task that stands for one of the paper's when that one is absent (MMBench without the GPT judge).
PAPER_STAND_INS = {"mmbench_en_dev_static": "mmbench_en_dev"}
# Extra columns read from another task's metrics: column -> (task, metric).
EXTRA_COLUMNS = {"mme_cognition": ("mme", "mme_cognition_score")}


def headline(task: str, metrics: dict, higher_is_better: dict | None = None) -> tuple[Headline, float] | None:
    """(headline, scaled value) of one task's results, or None when it has no numeric metric."""
    known = HEADLINES.get(task)
    if known is not None:
        value = metric_value(metrics, known.metric)
        if value is not None:
            return known, value * known.scale
    preferred = list((higher_is_better or {}).keys())
    for name in preferred + sorted({key.split(",")[0] for key in metrics}):
        if name in ("submission",):
            continue
        value = metric_value(metrics, name)
        if value is not None:
            return Headline(name, f"{task} {name}", 1.0, 3, "as lmms-eval reports it"), value
    return None


def metric_value(metrics: dict, name: str) -> float | None:
    """Metric `name` of one task's `{"<metric>,<filter>": value}`, preferring the "none" filter."""
    for key in (f"{name},none", name):
        if is_number(metrics.get(key)):
            return float(metrics[key])
    for key, value in metrics.items():
        if key.split(",")[0] == name and is_number(value):
            return float(value)
    return None


def task_order(tasks: set[str]) -> list[str]:
    """The table's task columns: the known tasks in `HEADLINES` order, then the others by name."""
    known = [task for task in HEADLINES if task in tasks]
    return known + sorted(tasks - set(known))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregated_tasks(tasks) -> list[str]:
    """The task columns that cross-task aggregates (average rank, relative score, the figures'
    averages and pooled statistics, the Wilcoxon pairs) read: the paper's 11 metrics among
    `tasks` (`PAPER_TASKS`; `PAPER_STAND_INS` when the paper's own task is absent); when none of
    them is there (the smoke tasks, another suite), every task column. Never an extra column
    (`EXTRA_COLUMNS`, e.g. MME cognition: a second number of a task already counted)."""
    tasks = list(tasks)
    paper = [task for task in tasks if task in PAPER_TASKS
             or (task in PAPER_STAND_INS and PAPER_STAND_INS[task] not in tasks)]
    if paper:
        return paper
    return [task for task in tasks if task not in EXTRA_COLUMNS]


def aggregation_note(tasks) -> str:
    """The sentence under the table that says which columns the aggregates read."""
    used = aggregated_tasks(tasks)
    shown = [task for task in tasks if task not in used]
    label = ", ".join(HEADLINES[t].label if t in HEADLINES else t for t in used) or "none"
    text = (f"Aggregates (Avg. rank, relative score, the figures' averages and pooled statistics, the Wilcoxon test) "
            f"read {len(used)} metric(s): {label}")
    if not any(task in PAPER_TASKS for task in used):
        text += " (none of the paper's 11 benchmarks is in these runs)"
    if shown:
        text += "; shown but never aggregated: " + ", ".join(HEADLINES[t].label if t in HEADLINES else t for t in shown)
    return text + "."
