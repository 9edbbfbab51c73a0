"""Reading a log folder: lmms-eval's results files, our record runs, which run belongs to which
results file, and the settings of a run (from its records, else run_OTPrune.sh's otprune_run.json)."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from otprune.eval.records import iter_records, model_name_from_args, normalized_settings, setting_keys
from otprune.eval.report.headlines import is_number

DEFAULT_TIMEZONE = "Asia/Singapore"  # lmms-eval 0.7's default --timezone
RUN_INFO = "otprune_run.json"  # written by run_OTPrune.sh into each run's --output_path


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

    def covers(self, task: str) -> bool:
        """True when `task` (a task, a group or the whole `--tasks` value) was run here."""
        return task in self.tasks or task in self.groups or task == self.cli_tasks


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

    def settings(self) -> dict:
        """The settings (`setting_keys()`) of this run's records."""
        return normalized_settings({key: self.field(key) for key in setting_keys()})


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
    """The `ResultFile` of `path`, whose JSON is `data`."""
    config = data.get("config") or {}
    cli = config.get("resolved_cli_args") or {}
    model_args = str(config.get("model_args") or cli.get("model_args") or "")
    model = data.get("model_name") or model_name_from_args(model_args) or str(config.get("model") or "?")
    groups = {name: list(tasks) for name, tasks in (data.get("group_subtasks") or {}).items()}
    tasks = {}
    for name, metrics in data["results"].items():
        if not isinstance(metrics, dict) or (name in groups and groups[name]):
            continue
        values = {key: value for key, value in metrics.items() if is_number(value) and "_stderr" not in key}
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
        best = _results_of(run, results)
        if best is None:
            unmatched.append(run)
        else:
            matched[best.path].append(run)
    return dict(matched), unmatched


def _results_of(run: RecordRun, results: Sequence[ResultFile]) -> ResultFile | None:
    """The results file `run` wrote into: in its folder (else same output path and model args),
    covering its tasks, the latest that started before its first record."""
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
        candidates = [result for result in candidates if all(result.covers(name) for name in wanted)]
    first = run.first
    started = [result for result in candidates if result.start is not None and result.start <= first + 1.0]
    if started:
        return max(started, key=lambda result: result.start)
    if candidates and all(result.start is None for result in candidates):
        return min(candidates, key=lambda result: (result.path.stat().st_mtime < first, result.path.stat().st_mtime))
    return None


def run_info(folder: Path, root: Path) -> dict | None:
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
                return normalized_settings({**info, "method": _canonical_method(method)})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
        if place == root:
            break
    return None


def _canonical_method(value) -> str:
    """The registry name of a BASELINE / method value; unknown names lower-cased as they are."""
    try:
        from otprune.config import canonical_method

        return canonical_method(str(value))
    except (ImportError, ValueError):
        return str(value).strip().lower()


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
