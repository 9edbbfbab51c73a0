"""The table's rows: one per model x setting (`setting_keys()`), with each task's headline score and
the FLOPs / latency sums of its records; how rows are labelled and in which order they are listed.

A row carries the method parameters generically (`Row.params`, one entry per
`otprune.methods.all_params()` name), so a method with a new `param()` needs no change here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from otprune.eval import adaptive
from otprune.eval.evidence import RunEvidence
from otprune.eval.records import normalized_settings, param_keys, setting_defaults, setting_keys
from otprune.eval.report.collect import ResultFile
from otprune.eval.report.documents import document_distances
from otprune.eval.report.headlines import (
    EXTRA_COLUMNS,
    HEADLINES,
    headline,
    is_number,
    metric_value,
    task_order,
)
from otprune.eval.runspec import RunSpec, model_folder, model_label_of
from otprune.methods import all_params, display_name, table_rank

UNKNOWN_METHOD = "?"
MODEL_ORDER = ("llava-v1.5-7b", "llava-v1.5-13b", "llava-v1.6-vicuna-7b")


@dataclasses.dataclass
class Row:
    model: str
    method: str | None  # canonical method name; None = unpruned; UNKNOWN_METHOD = no records
    ratio: float | None
    layer: int | None
    # every registered method parameter (`all_params()` order) -> value; None: unpruned, or not a
    # parameter of the method
    params: dict[str, object] = dataclasses.field(default_factory=dict)
    order: str | None = None
    recipe: str | None = None
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # task -> headline value (scaled)
    lower_is_better: set[str] = dataclasses.field(default_factory=set)
    sources: dict[str, ResultFile] = dataclasses.field(default_factory=dict)  # task -> results file used
    buckets: dict[Path, dict] = dataclasses.field(default_factory=dict)  # results file -> flops / latency sums
    rank: float | None = None
    relative: float | None = None
    spec: RunSpec | None = None  # the run spec of the row (any of its tasks'); None for hand-made rows
    relative_note: str | None = None  # why a pruned row has no relative score

    @classmethod
    def from_settings(cls, model: str, settings: Mapping) -> Row:
        """The row of `model` for `settings` ({key: value} for `setting_keys()`)."""
        return cls(
            model, settings.get("method"), settings.get("ratio"), settings.get("layer"),
            params={name: settings.get(name) for name in param_keys()},
            order=settings.get("order"), recipe=settings.get("recipe"),
        )  # fmt: skip

    @classmethod
    def from_spec(cls, spec: RunSpec) -> Row:
        """The row of a verified run's spec (its model label is set by `label_models`)."""
        settings = normalized_settings({**spec.settings_dict, "method": spec.method})
        row = cls.from_settings(spec.model, settings)
        row.spec = spec
        return row

    @property
    def settings(self) -> dict:
        """{key: value} for `setting_keys()`."""
        values = {"method": self.method, "layer": self.layer, "ratio": self.ratio, "order": self.order,
                  "recipe": self.recipe, **self.params}
        return {key: values.get(key) for key in setting_keys()}

    @property
    def key(self) -> tuple:
        if self.spec is not None:
            return (self.spec.row_key,)
        return (self.model, *self.settings.values())

    @property
    def pruned(self) -> bool:
        return self.method is not None and self.method != UNKNOWN_METHOD

    def tflops(self) -> float | None:
        values = [bucket["tflops"] / bucket["n"] for bucket in self.buckets.values() if bucket["n"]]
        return sum(values) / len(values) if values else None

    def tflops_percent(self) -> float | None:
        values = [
            100.0 * bucket["tflops"] / bucket["tflops_unpruned"]
            for bucket in self.buckets.values()
            if bucket["n"] and bucket["tflops_unpruned"] > 0
        ]
        return sum(values) / len(values) if values else None

    def mean(self, field: str) -> float | None:
        total = sum(bucket[field] for bucket in self.buckets.values())
        count = sum(bucket[field + "_n"] for bucket in self.buckets.values())
        return total / count if count else None

    def task_distance(self, task: str) -> float | None:
        """Mean per-image distance of the kept tokens (`otprune.distance`) over the records of the
        results file that gave `task`'s score; None when those records hold none."""
        source = self.sources.get(task)
        sums = self.buckets.get(source.path) if source is not None else None
        return sums["distance"] / sums["distance_n"] if sums and sums.get("distance_n") else None

    def distance(self) -> float | None:
        """Mean per-image distance over all the row's records."""
        total = sum(b.get("distance", 0.0) for b in self.buckets.values())
        count = sum(b.get("distance_n", 0) for b in self.buckets.values())
        return total / count if count else None

    def samples(self) -> int:
        return sum(bucket["n"] for bucket in self.buckets.values())

    def peak_memory_gb(self) -> float | None:
        """The largest prefill peak of the row's samples (GiB), None when no record measured one."""
        peaks = [bucket["peak_memory_mb"] for bucket in self.buckets.values() if "peak_memory_mb" in bucket]
        return max(peaks) / 1024 if peaks else None


@dataclasses.dataclass
class Report:
    log_dir: Path
    rows: list[Row]
    tasks: list[str]
    notes: list[str]
    provenance: list[str] = dataclasses.field(default_factory=list)  # lmms-eval version, MMBench judge
    unverified: list[str] = dataclasses.field(default_factory=list)  # runs kept out of every table, and why

    @property
    def ratios(self) -> list[float]:
        return sorted({row.ratio for row in self.rows if row.pruned and isinstance(row.ratio, (int, float))})


def collect_rows(verified: Sequence[tuple[RunEvidence, ResultFile]], root: Path) -> tuple[list[Row], list[str], list[str]]:
    """(rows in table order, task columns, notes) from the verified runs and their results files: one
    row per spec without its task (`RunSpec.row_key`), labelled by `label_models`."""
    notes: list[str] = []
    rows: dict[tuple, Row] = {}
    for run, result in sorted(verified, key=lambda item: (item[1].start or 0.0, item[1].date, str(item[1].path))):
        row = Row.from_spec(run.spec)
        row = rows.setdefault(row.key, row)
        _add_scores(row, result, root, notes)
        if any(source.path == result.path for source in row.sources.values()):
            row.buckets[result.path] = bucket(run.records)
    label_models(list(rows.values()))
    ordered = sorted(rows.values(), key=row_order)
    return ordered, task_order({task for row in ordered for task in row.scores}), notes


# Spec fields that tell apart rows of one model and setting (shown after the model's label).
VARIANT_FIELDS = ("engine", "lmms_model", "model_args", "batch_size", "limit", "extra_args", "versions")


def label_models(rows: Sequence[Row]) -> None:
    """Set each row's `model` to its label, the same in every table, figure and CSV: the model's short
    name, or `<name>-<8 hex of its identity>` when two models share it; then, when rows of that label
    differ in anything but the pruning (engine, model args, limit, versions, ...), those fields,
    e.g. "tiny-llava [limit=4]": rows are compared only under one label."""
    specs = [row for row in rows if row.spec is not None]
    identities: dict[str, set[str]] = {}
    for row in specs:
        identities.setdefault(model_label_of(row.spec.model), set()).add(row.spec.model)
    base = {}
    for row in specs:
        short = model_label_of(row.spec.model)
        base[id(row)] = short if len(identities[short]) == 1 else model_folder(row.spec.model)
    groups: dict[str, list[Row]] = {}
    for row in specs:
        groups.setdefault(base[id(row)], []).append(row)
    for label, members in groups.items():
        varying = [name for name in VARIANT_FIELDS
                   if len({json.dumps(row.spec.to_dict()[name], sort_keys=True) for row in members}) > 1]  # fmt: skip
        for row in members:
            extras = [f"{name}={_field_text(row.spec.to_dict()[name])}" for name in varying]
            row.model = label + (f" [{', '.join(extras)}]" if extras else "")


def _field_text(value: object) -> str:
    if value is None:
        return "all"
    if isinstance(value, list):
        return " ".join("=".join(map(str, item)) if isinstance(item, list) else str(item) for item in value) or "-"
    return str(value)


def _add_scores(row: Row, result: ResultFile, root: Path, notes: list[str]) -> None:
    """Put each task's headline of `result` into `row` (a newer results file replaces an older one)."""
    for task, metrics in result.tasks.items():
        found = headline(task, metrics, result.higher_is_better.get(task))
        if found is None:
            continue
        if task in row.sources:
            old = row.sources[task].path
            notes.append(
                f"{task} of {model_label(row.model)} / {row_label(row)}: several results; "
                f"using the newest ({old.relative_to(root)} -> {result.path.relative_to(root)})"
            )
            if all(source.path != old for name, source in row.sources.items() if name != task):
                row.buckets.pop(old, None)
        row.scores[task] = found[1]
        if result.higher_is_better.get(task, {}).get(found[0].metric) is False:
            row.lower_is_better.add(task)
        row.sources[task] = result
        for column, (source_task, metric) in EXTRA_COLUMNS.items():
            if source_task == task and (value := metric_value(metrics, metric)) is not None:
                row.scores[column] = value * HEADLINES[column].scale
                row.sources[column] = result


def bucket(records: Iterable[dict]) -> dict:
    """The sums a row averages over one results file's records: samples, TFLOPs, latencies."""
    records = list(records)
    sums = {"n": 0, "tflops": 0.0, "tflops_unpruned": 0.0, "prefill_ms": 0.0, "prefill_ms_n": 0, "select_ms": 0.0, "select_ms_n": 0}
    for record in records:
        if is_number(record.get("tflops")) and is_number(record.get("tflops_unpruned")):
            sums["n"] += 1
            sums["tflops"] += float(record["tflops"])
            sums["tflops_unpruned"] += float(record["tflops_unpruned"])
        after, before, kept_n = adaptive.kept_sums([record])
        sums["kept_after"] = sums.get("kept_after", 0.0) + after
        sums["kept_before"] = sums.get("kept_before", 0.0) + before
        sums["kept_n"] = sums.get("kept_n", 0) + kept_n
        for field in ("prefill_ms", "select_ms"):
            if field == "select_ms" and record.get("method") is None:
                continue  # nothing is selected when pruning is off
            if is_number(record.get(field)):
                sums[field] += float(record[field])
                sums[field + "_n"] += 1
        if is_number(record.get("peak_memory_mb")):  # None on a CPU: unknown, left out
            sums["peak_memory_mb"] = max(sums.get("peak_memory_mb", 0.0), float(record["peak_memory_mb"]))
    total, count, kinds, _ = document_distances(records)  # per image, once per document (issue #23)
    if count:
        sums.update(distance=total, distance_n=count, distance_kinds=kinds)
    return sums


def row_order(row: Row) -> tuple:
    """Sort key: model (paper order), unpruned first, kept ratio descending, method (`table_rank`),
    layer, then the other settings."""
    label = model_label(row.model)
    model_rank = MODEL_ORDER.index(label) if label in MODEL_ORDER else len(MODEL_ORDER)
    extras = (*(str(row.params.get(name)) for name in param_keys()), str(row.order), str(row.recipe))
    return (model_rank, row.model, row.method is not None, adaptive.sort_key(row.ratio), table_rank(row.method), str(row.method),
            row.layer or 0, extras)


def method_label(method: str | None) -> str:
    if method == UNKNOWN_METHOD:
        return "? (no records)"
    return display_name(method)


def row_label(row: Row) -> str:
    """The method's name, plus the settings that are not the method's defaults (and FitPrune's recipe):
    "OTPrune (γ=0.05)", "Random (seed=3)", "OTPrune (official order)"."""
    label = method_label(row.method)
    if not row.pruned:
        return label
    defaults = setting_defaults(row.method)
    specs = all_params()
    extras = [
        f"{specs[name].label if name in specs else name}={_value_text(value)}"
        for name, value in row.params.items()
        if value is not None and value != defaults.get(name)
    ]
    if row.order is not None and row.order != defaults["order"]:
        extras.append(f"{row.order} order")
    if row.recipe is not None:
        extras.append(Path(row.recipe).name)
    return label + (f" ({', '.join(extras)})" if extras else "")


def model_label(model: str) -> str:
    """The model's label: rows carry their unique label (`label_models`); for a bare path or hub id,
    its last part."""
    if " [" in model:
        return model
    return model.rstrip("/").split("/")[-1] or model


def _value_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
