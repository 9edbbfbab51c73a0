"""The paper-style results table (Table 1) from lmms-eval logs and our per-sample records.

Input, found recursively under a log folder:

- lmms-eval 0.7 results, `<output_path>/<model>/<date>_results.json`: per task a dict of
  `"<metric>,<filter>": value` under "results", the model name, the command line under
  "config" / "resolved_cli_args" and the start `date` (in `--timezone`, default Asia/Singapore);
- our records (`otprune.eval.records`): JSONL files whose lines carry the "otprune_record" marker, one
  line per sample with method, layer, ratio, TFLOPs and latencies.

Each group of records (one `run` = one process) is matched to the results file it belongs to:
results in the same folder (else with the same `--output_path` and `--model_args`) whose tasks
include the run's `--tasks`, and among those the latest that started before the run's first
record. The records give the row's settings (method, layer, ratio, gamma, seed, order, recipe:
`otprune.eval.records.setting_keys()`) and its FLOPs and latency; results without records take them from
run_OTPrune.sh's `otprune_run.json`.

Output: one row per model x setting (method, kept ratio, layer, and gamma / seed / order / recipe,
which the method label shows when they are not the defaults), each task's headline metric (scaled as
in the paper: accuracies in %, CIDEr and MME raw), mean TFLOPs and their % of unpruned (the mean
over tasks of pruned / unpruned, as the paper computes it), mean prefill latency and selection
time, and the average rank among the pruned rows of the same model and kept ratio.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from otprune.eval import adaptive
from otprune.eval.records import iter_records, normalized_settings, setting_defaults, setting_keys
from otprune.methods import display_name, table_rank


@dataclasses.dataclass(frozen=True)
class Headline:
    """The metric a task is summarised by: lmms-eval metric name, column label, scale, decimals."""

    metric: str
    label: str
    scale: float = 1.0
    digits: int = 2


# The paper's 11 tasks (ALGORITHM.md 7, in the paper's column order) and our smoke tasks.
HEADLINES: dict[str, Headline] = {
    "coco2017_cap_val": Headline("coco_CIDEr", "COCO CIDEr"),
    "flickr30k_test": Headline("flickr_CIDEr", "Flickr CIDEr"),
    "gqa": Headline("exact_match", "GQA EM", 100.0),
    "mmbench_en_dev": Headline("gpt_eval_score", "MMB Acc"),  # lmms-eval already reports %
    "mmbench_en_dev_static": Headline("gpt_eval_score", "MMB Acc (static)"),  # no judge: rule-based matching
    "mme": Headline("mme_perception_score", "MME P", 1.0, 0),  # the paper's MME number: perception
    "mme_cognition": Headline("mme_cognition_score", "MME C", 1.0, 0),  # lmms-eval's second MME score, beside it
    "mmmu_val": Headline("mmmu_acc", "MMMU Acc", 100.0),
    "nocaps_val": Headline("nocaps_CIDEr", "NoCaps CIDEr"),
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
# Extra columns read from another task's metrics: column -> (task, metric).
EXTRA_COLUMNS = {"mme_cognition": ("mme", "mme_cognition_score")}
# MMBench's GPT judge when MODEL_VERSION is not set (lmms-eval 0.7's mmbench en_utils default); the
# paper's lmms-eval judged with gpt-3.5-turbo-0613.
DEFAULT_MMBENCH_JUDGE = "gpt-4o-2024-11-20"
SMOKE_TASKS = ("otprune_smoke_gen", "otprune_smoke_mc")

MODEL_ORDER = ("llava-v1.5-7b", "llava-v1.5-13b", "llava-v1.6-vicuna-7b")
UNKNOWN_METHOD = "?"
DEFAULT_TIMEZONE = "Asia/Singapore"  # lmms-eval 0.7's default --timezone


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class ResultFile:
    """One lmms-eval `*_results.json`."""

    path: Path
    model: str  # model name as lmms-eval reports it (e.g. the pretrained= value)
    model_args: str
    output_path: str | None
    tasks: dict[str, dict]  # task -> {"metric,filter": value}
    groups: dict[str, list[str]]
    higher_is_better: dict[str, dict]
    cli_tasks: str | None
    limit: object
    date: str
    start: float | None  # epoch seconds of the run's start, from `date` and the time zone

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclasses.dataclass
class RecordRun:
    """The records of one process (same file and `run` id)."""

    run: str
    files: set[Path]
    records: list[dict]

    @property
    def folders(self) -> set[Path]:
        return {path.parent for path in self.files}

    @property
    def first(self) -> float:
        return min(float(record.get("time", 0.0)) for record in self.records)

    def field(self, name: str):
        """The value of `name` in this run's records (the most common one if they differ)."""
        counts: dict[str, tuple[int, object]] = {}
        for record in self.records:
            value = record.get(name)
            key = json.dumps(value, sort_keys=True)
            count, _ = counts.get(key, (0, value))
            counts[key] = (count + 1, value)
        return max(counts.values(), key=lambda item: item[0])[1] if counts else None


def find_result_files(log_dir: Path) -> list[ResultFile]:
    """Every lmms-eval results file under `log_dir` (files that are not lmms-eval's are skipped)."""
    found = []
    for path in sorted(log_dir.rglob("*_results.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            continue
        found.append(parse_result_file(path, data))
    return found


def parse_result_file(path: Path, data: dict) -> ResultFile:
    config = data.get("config") or {}
    cli = config.get("resolved_cli_args") or {}
    model_args = str(config.get("model_args") or cli.get("model_args") or "")
    model = data.get("model_name") or _model_from_args(model_args) or str(config.get("model") or "?")
    groups = {name: list(tasks) for name, tasks in (data.get("group_subtasks") or {}).items()}
    tasks = {}
    for name, metrics in data["results"].items():
        if not isinstance(metrics, dict) or (name in groups and groups[name]):
            continue
        values = {key: value for key, value in metrics.items() if _is_number(value) and "_stderr" not in key}
        if values:
            tasks[name] = values
    date = str(data.get("date") or path.name.split("_results.json")[0])
    return ResultFile(
        path=path,
        model=str(model),
        model_args=model_args,
        output_path=cli.get("output_path"),
        tasks=tasks,
        groups=groups,
        higher_is_better=data.get("higher_is_better") or {},
        cli_tasks=cli.get("tasks"),
        limit=config.get("limit", cli.get("limit")),
        date=date,
        start=_epoch(date, cli.get("timezone") or DEFAULT_TIMEZONE),
    )


def find_record_runs(log_dir: Path) -> list[RecordRun]:
    """Every group of per-sample records under `log_dir` (JSONL files whose lines are records)."""
    runs: dict[str, RecordRun] = {}
    for path in sorted(log_dir.rglob("*.jsonl")):
        if "_samples_" in path.name and not path.name.startswith("otprune_records"):
            continue  # lmms-eval's --log_samples files
        for value in iter_records(path, tolerant=True):
            run_id = str(value.get("run") or path)
            run = runs.setdefault(f"{path}\0{run_id}", RecordRun(run_id, set(), []))
            run.files.add(path)
            run.records.append(value)
    return list(runs.values())


def associate(results: Sequence[ResultFile], runs: Sequence[RecordRun]) -> tuple[dict[Path, list[RecordRun]], list[RecordRun]]:
    """Match each record run to its results file: {results path: [runs]}, and the unmatched runs."""
    matched: dict[Path, list[RecordRun]] = defaultdict(list)
    unmatched = []
    for run in runs:
        candidates = [result for result in results if result.folder in run.folders]
        if not candidates:
            output_path, model_args = run.field("output_path"), run.field("model_args")
            candidates = [
                result
                for result in results
                if output_path is not None and result.output_path == output_path and result.model_args == (model_args or "")
            ]
        tasks = run.field("tasks")
        if tasks:
            wanted = [name for name in str(tasks).split(",") if name]
            candidates = [result for result in candidates if all(_covers(result, name) for name in wanted)]
        first = run.first
        started = [result for result in candidates if result.start is not None and result.start <= first + 1.0]
        if started:
            best = max(started, key=lambda result: result.start)
        elif candidates and all(result.start is None for result in candidates):
            best = min(candidates, key=lambda result: (result.path.stat().st_mtime < first, result.path.stat().st_mtime))
        else:
            best = None
        if best is None:
            unmatched.append(run)
        else:
            matched[best.path].append(run)
    return dict(matched), unmatched


# ----------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class Row:
    model: str
    method: str | None  # canonical method name; None = unpruned; UNKNOWN_METHOD = no records
    ratio: float | None
    layer: int | None
    gamma: float | None = None  # None: unpruned, or not a parameter of the method
    seed: int | None = None
    order: str | None = None
    recipe: str | None = None
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # task -> headline value (scaled)
    lower_is_better: set[str] = dataclasses.field(default_factory=set)
    sources: dict[str, ResultFile] = dataclasses.field(default_factory=dict)  # task -> results file used
    buckets: dict[Path, dict] = dataclasses.field(default_factory=dict)  # results file -> flops / latency sums
    rank: float | None = None
    relative: float | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.method, self.ratio, self.layer, self.gamma, self.seed, self.order, self.recipe)

    @property
    def settings(self) -> dict:
        return {key: getattr(self, key) for key in setting_keys()}

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

    def samples(self) -> int:
        return sum(bucket["n"] for bucket in self.buckets.values())


@dataclasses.dataclass
class Report:
    log_dir: Path
    rows: list[Row]
    tasks: list[str]
    notes: list[str]
    provenance: list[str] = dataclasses.field(default_factory=list)  # lmms-eval version, MMBench judge

    @property
    def ratios(self) -> list[float]:
        return sorted({row.ratio for row in self.rows if row.pruned and isinstance(row.ratio, (int, float))})


def headline(task: str, metrics: dict, higher_is_better: dict | None = None) -> tuple[Headline, float] | None:
    """(headline, scaled value) of one task's results, or None when it has no numeric metric."""
    known = HEADLINES.get(task)
    if known is not None:
        value = _metric(metrics, known.metric)
        if value is not None:
            return known, value * known.scale
    preferred = list((higher_is_better or {}).keys())
    for name in preferred + sorted({key.split(",")[0] for key in metrics}):
        if name in ("submission",):
            continue
        value = _metric(metrics, name)
        if value is not None:
            return Headline(name, f"{task} {name}", 1.0, 3), value
    return None


def build_report(log_dir: str | os.PathLike) -> Report:
    """Read everything under `log_dir` and build the table (raises ValueError if there are no results)."""
    root = Path(log_dir)
    if not root.exists():
        raise FileNotFoundError(f"LOG_DIR={str(log_dir)!r}: no such directory")
    if not root.is_dir():
        raise ValueError(f"LOG_DIR={str(log_dir)!r}: not a directory")
    results = find_result_files(root)
    if not results:
        raise ValueError(
            f"LOG_DIR={str(log_dir)!r}: no lmms-eval results (*_results.json) found under it; run lmms-eval with "
            f"--output_path {log_dir} (or `bash run_OTPrune.sh --log-dir {log_dir}`, `bash run_OTPrune.sh --smoke`) first"
        )
    runs = find_record_runs(root)
    matched, unmatched = associate(results, runs)
    notes = []
    for run in unmatched:
        files = ", ".join(sorted(str(path.relative_to(root)) for path in run.files))
        notes.append(f"records of run {run.run} ({files}) match no results file (interrupted run?); left out")

    rows: dict[tuple, Row] = {}
    for result in sorted(results, key=lambda result: (result.start or 0.0, result.date, str(result.path))):
        result_runs = matched.get(result.path, [])
        if result_runs:
            settings = _run_settings(result_runs[0])
            seen = {tuple(_run_settings(run).values()) for run in result_runs}
            if len(seen) > 1:
                notes.append(f"{result.path.relative_to(root)}: its records disagree on the setting {sorted(map(str, seen))}")
        elif (info := _run_info(result.folder, root)) is not None:
            settings = info
            notes.append(
                f"{result.path.relative_to(root)}: no per-sample records (FLOPs and latency unknown); "
                "setting from run_OTPrune.sh's otprune_run.json"
            )
        else:
            settings = dict(dict.fromkeys(setting_keys()), method=UNKNOWN_METHOD)
            notes.append(f"{result.path.relative_to(root)}: no per-sample records; method, FLOPs and latency unknown")
        row = Row(result.model, **settings)
        row = rows.setdefault(row.key, row)
        for task, metrics in result.tasks.items():
            found = headline(task, metrics, result.higher_is_better.get(task))
            if found is None:
                continue
            if task in row.sources:
                notes.append(
                    f"{task} of {_model_label(row.model)} / {_row_label(row)}: several results; "
                    f"using the newest ({row.sources[task].path.relative_to(root)} -> {result.path.relative_to(root)})"
                )
                old = row.sources[task].path
                if all(source.path != old for name, source in row.sources.items() if name != task):
                    row.buckets.pop(old, None)
            row.scores[task] = found[1]
            if result.higher_is_better.get(task, {}).get(found[0].metric) is False:
                row.lower_is_better.add(task)
            row.sources[task] = result
            for column, (source_task, metric) in EXTRA_COLUMNS.items():
                if source_task == task and (value := _metric(metrics, metric)) is not None:
                    row.scores[column] = value * HEADLINES[column].scale
                    row.sources[column] = result
        if result_runs and any(source.path == result.path for source in row.sources.values()):
            row.buckets[result.path] = _bucket(record for run in result_runs for record in run.records)

    ordered = sorted(rows.values(), key=_row_order)
    tasks = _task_order({task for row in ordered for task in row.scores})
    _ranks(ordered, tasks)
    _relative(ordered, tasks)
    return Report(root, ordered, tasks, notes, _provenance(runs, tasks))


def _provenance(runs: Sequence[RecordRun], tasks: Sequence[str]) -> list[str]:
    """Footer lines: the lmms-eval version(s) the records were written under, and MMBench's judge."""
    from otprune.eval.records import installed_version

    records = [record for run in runs for record in run.records]
    versions = sorted({str(r["lmms_eval_version"]) for r in records if r.get("lmms_eval_version")})
    if versions:
        lines = [f"lmms-eval: {', '.join(versions)} (from the records)."]
    else:
        lines = [f"lmms-eval: {installed_version('lmms-eval') or 'unknown'} (installed when this report was made; "
                 "the records do not say)."]
    if any(task.startswith("mmbench") for task in tasks):
        judges = sorted({r.get("mmbench_judge") or f"{DEFAULT_MMBENCH_JUDGE} (lmms-eval's default)" for r in records})
        static = [task for task in tasks if task.endswith("_static")]
        judge = ", ".join(judges) or f"{DEFAULT_MMBENCH_JUDGE} (lmms-eval's default)"
        lines.append(
            f"MMBench judge: {judge} (set MODEL_VERSION to change; the paper's lmms-eval used gpt-3.5-turbo-0613)"
            + (f"; {', '.join(static)}: rule-based answer matching, no judge." if static else ".")
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Output


def flops_unit(report: Report) -> tuple[str, float]:
    """(unit, factor from TFLOPs): TFLOPs for real models, smaller units for tiny test models."""
    values = [value for row in report.rows if (value := row.tflops()) is not None]
    largest = max(values, default=1.0)
    for unit, factor in (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6)):
        if largest * factor >= 0.1:
            return unit, factor
    return "kFLOPs", 1e9


def columns(report: Report) -> list[str]:
    labels = [_task_headline(task, report).label for task in report.tasks]
    unit = flops_unit(report)[0]
    return ["Model", "Method", "Layer", "Kept", f"{unit} (% unpruned)", *labels, "Prefill ms", "Select ms", "Avg. rank"]


def table_cells(report: Report) -> list[list[str]]:
    cells = []
    factor = flops_unit(report)[1]
    for row in report.rows:
        tflops, percent = row.tflops(), row.tflops_percent()
        flops_cell = "–" if tflops is None else f"{tflops * factor:.3f}" + ("" if percent is None else f" ({_percent(percent)})")
        if adaptive.is_adaptive(row.ratio):  # per-image budgets: Table 1's "Variable", per-sample mean
            flops_cell = adaptive.flops_cell(flops_cell)
        scores = []
        for task in report.tasks:
            value = row.scores.get(task)
            scores.append("–" if value is None else f"{value:.{_task_headline(task, report).digits}f}")
        cells.append(
            [
                _model_label(row.model),
                _row_label(row),
                "–" if row.layer is None else str(row.layer),
                "100%" if not row.pruned and row.method is None else (
                    adaptive.kept_cell(row.buckets.values()) if adaptive.is_adaptive(row.ratio)
                    else "–" if row.ratio is None else f"{100 * row.ratio:.4g}%"),
                flops_cell,
                *scores,
                _fmt(row.mean("prefill_ms"), 1),
                _fmt(row.mean("select_ms"), 2),
                _fmt(row.rank, 2),
            ]
        )
    return cells


def to_markdown(report: Report) -> str:
    head = columns(report)
    lines = [
        f"# OTPrune results: {report.log_dir}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if index < 4 else "---:" for index in range(len(head))) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(report)]
    lines += [
        "",
        "FLOPs: mean over tasks of the per-sample decoder FLOPs (4nd^2 + 2n^2d + 2ndm per layer, actual lengths); "
        "% = mean over tasks of pruned / unpruned. Prefill / Select: mean per sample. "
        "Avg. rank: per task, rank among the pruned rows of the same model and kept ratio (1 = best), averaged.",
    ]
    if report.provenance:
        lines += ["", " ".join(report.provenance)]
    if report.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in report.notes]]
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    task_columns = [f"{task}:{_task_headline(task, report).metric}" for task in report.tasks]
    writer.writerow(
        ["model", "method", "layer", "ratio", "gamma", "seed", "order", "recipe", "tflops", "tflops_percent", *task_columns,
         "prefill_ms", "select_ms", "avg_rank", "relative_score", "samples"]
    )
    for row in report.rows:
        writer.writerow(
            [row.model, _method_label(row.method), _blank(row.layer), _blank(row.ratio), _blank(row.gamma), _blank(row.seed),
             _blank(row.order), _blank(row.recipe), _blank(row.tflops()),
             _blank(row.tflops_percent()), *[_blank(row.scores.get(task)) for task in report.tasks],
             _blank(row.mean("prefill_ms")), _blank(row.mean("select_ms")), _blank(row.rank), _blank(row.relative),
             row.samples()]
        )
    return out.getvalue()


def plot(report: Report, path: str | os.PathLike) -> bool:
    """PNG of relative score (% of the unpruned model, mean over tasks) vs kept ratio; False if
    fewer than two kept ratios or no unpruned rows to compare with."""
    points: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    labels: dict[tuple, str] = {}
    for row in report.rows:
        if row.pruned and isinstance(row.ratio, (int, float)) and row.relative is not None:
            line = (row.model, row.method, row.layer, row.gamma, row.seed, row.order, row.recipe)
            points[line].append((row.ratio, row.relative))
            labels[line] = f"{_model_label(row.model)} {_row_label(row)}" + ("" if not row.layer else f" L{row.layer}")
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


def write_report(log_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Report, dict[str, Path]]:
    """Build the report and write markdown, CSV and (when useful) the PNG; returns what was written."""
    report = build_report(log_dir)
    markdown = Path(out) if out is not None else Path(log_dir) / "otprune_report.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(to_markdown(report), encoding="utf-8")
    written = {"markdown": markdown}
    table = markdown.with_suffix(".csv")
    table.write_text(to_csv(report), encoding="utf-8")
    written["csv"] = table
    picture = markdown.with_suffix(".png")
    if plot(report, picture):
        written["png"] = picture
    return report, written


# ----------------------------------------------------------------------------------------------
# Helpers


def _bucket(records: Iterable[dict]) -> dict:
    bucket = {"n": 0, "tflops": 0.0, "tflops_unpruned": 0.0, "prefill_ms": 0.0, "prefill_ms_n": 0, "select_ms": 0.0, "select_ms_n": 0}
    for record in records:
        if _is_number(record.get("tflops")) and _is_number(record.get("tflops_unpruned")):
            bucket["n"] += 1
            bucket["tflops"] += float(record["tflops"])
            bucket["tflops_unpruned"] += float(record["tflops_unpruned"])
        after, before, kept_n = adaptive.kept_sums([record])
        bucket["kept_after"] = bucket.get("kept_after", 0.0) + after
        bucket["kept_before"] = bucket.get("kept_before", 0.0) + before
        bucket["kept_n"] = bucket.get("kept_n", 0) + kept_n
        for field in ("prefill_ms", "select_ms"):
            if field == "select_ms" and record.get("method") is None:
                continue  # nothing is selected when pruning is off
            if _is_number(record.get(field)):
                bucket[field] += float(record[field])
                bucket[field + "_n"] += 1
    return bucket


def _ranks(rows: list[Row], tasks: list[str]) -> None:
    """Average rank (1 = best, ties share the mean rank) among pruned rows of the same model and ratio."""
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


def _relative(rows: list[Row], tasks: list[str]) -> None:
    """Mean over tasks of score / unpruned score of the same model (in %), for pruned rows."""
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


def _task_headline(task: str, report: Report) -> Headline:
    if task in HEADLINES:
        return HEADLINES[task]
    for row in report.rows:
        source = row.sources.get(task)
        if source is not None:
            found = headline(task, source.tasks[task], source.higher_is_better.get(task))
            if found is not None:
                return found[0]
    return Headline("?", task, 1.0, 3)


def _task_order(tasks: set[str]) -> list[str]:
    known = [task for task in HEADLINES if task in tasks]
    return known + sorted(tasks - set(known))


def _row_order(row: Row) -> tuple:
    label = _model_label(row.model)
    model_rank = MODEL_ORDER.index(label) if label in MODEL_ORDER else len(MODEL_ORDER)
    method_rank = table_rank(row.method)
    extras = (str(row.gamma), str(row.seed), str(row.order), str(row.recipe))
    return (model_rank, row.model, row.method is not None, adaptive.sort_key(row.ratio), method_rank, str(row.method), row.layer or 0,
            extras)


RUN_INFO = "otprune_run.json"  # written by run_OTPrune.sh into each run's --output_path


def _run_info(folder: Path, root: Path) -> dict | None:
    """The settings (`setting_keys()`) in the nearest otprune_run.json between `folder` and `root`.

    run_OTPrune.sh writes the canonical `method` and every setting; older files have only
    "baseline" (the BASELINE value), "layer" and "ratio"."""
    for place in [folder, *folder.parents]:
        path = place / RUN_INFO
        if path.is_file():
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
                method = info.get("method", info.get("baseline"))
                if method is None:
                    return dict.fromkeys(setting_keys())
                try:
                    from otprune.config import canonical_method

                    method = canonical_method(str(method))
                except (ImportError, ValueError):
                    method = _method(method)
                return normalized_settings({**info, "method": method})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
        if place == root:
            break
    return None


def _run_settings(run: RecordRun) -> dict:
    """The settings (`setting_keys()`) of one run's records."""
    return normalized_settings({key: run.field(key) for key in setting_keys()})


def _method(value) -> str | None:
    if value is None:
        return None
    return str(value).strip().lower()


def _method_label(method: str | None) -> str:
    if method == UNKNOWN_METHOD:
        return "? (no records)"
    return display_name(method)


def _row_label(row: Row) -> str:
    """The method's name, plus the settings that are not PruneConfig's defaults (and FitPrune's recipe)."""
    label = _method_label(row.method)
    if not row.pruned:
        return label
    defaults = setting_defaults(row.method)
    extras = []
    if row.gamma is not None and row.gamma != defaults["gamma"]:
        extras.append(f"γ={row.gamma:g}")
    if row.seed is not None and row.seed != defaults["seed"]:
        extras.append(f"seed={row.seed}")
    if row.order is not None and row.order != defaults["order"]:
        extras.append(f"{row.order} order")
    if row.recipe is not None:
        extras.append(Path(row.recipe).name)
    return label + (f" ({', '.join(extras)})" if extras else "")


def _model_label(model: str) -> str:
    return model.rstrip("/").split("/")[-1] or model


def _model_from_args(model_args: str) -> str:
    from otprune.eval.records import model_name_from_args

    return model_name_from_args(model_args)


def _metric(metrics: dict, name: str) -> float | None:
    for key in (f"{name},none", name):
        if _is_number(metrics.get(key)):
            return float(metrics[key])
    for key, value in metrics.items():
        if key.split(",")[0] == name and _is_number(value):
            return float(value)
    return None


def _covers(result: ResultFile, name: str) -> bool:
    return name in result.tasks or name in result.groups or name == result.cli_tasks


def _epoch(date: str, timezone: str) -> float | None:
    try:
        moment = datetime.datetime.strptime(date, "%Y%m%d_%H%M%S")
    except ValueError:
        return None
    try:
        from zoneinfo import ZoneInfo

        return moment.replace(tzinfo=ZoneInfo(timezone)).timestamp()
    except Exception:  # unknown zone or no tz database: fall back to file times
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value: float) -> str:
    from otprune.flops import format_percent

    return f"{format_percent(value)}%"


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _blank(value) -> object:
    return "" if value is None else value
