"""Reading a log folder: lmms-eval's results files and the evidence of the runs that wrote them.

A results file belongs to the run whose closing line names its sha256 (`otprune.eval.evidence`):
the join is by what the evaluating process wrote, never by folder names or time. A results file
that no run names, or whose run does not prove its setting, is unverified.

A file that cannot be read (not UTF-8, not JSON, not ours) or a record line with an invalid field
is skipped with a warning naming it (and the line): `warnings`, which the report shows in its notes
and prints on stderr.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
from pathlib import Path

from otprune.eval.records import model_name_from_args
from otprune.eval.report.headlines import is_number

DEFAULT_TIMEZONE = "Asia/Singapore"  # lmms-eval 0.7's default --timezone


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
    digest: str | None = None  # sha256 of the file's bytes (how a run's closing line names it)
    n_samples: dict[str, int] = dataclasses.field(default_factory=dict)  # task -> documents evaluated
    non_finite: list[str] = dataclasses.field(default_factory=list)  # "task metric" whose value is NaN / inf

    @property
    def folder(self) -> Path:
        return self.path.parent

    def covers(self, task: str) -> bool:
        """True when `task` (a task, a group or the whole `--tasks` value) was run here."""
        return task in self.tasks or task in self.groups or task == self.cli_tasks


def find_result_files(log_dir: Path, warnings: list[str] | None = None) -> list[ResultFile]:
    """Every lmms-eval results file under `log_dir`; a file that is not one is skipped with a warning
    (appended to `warnings`)."""
    warnings = [] if warnings is None else warnings
    found = []
    for path in sorted(log_dir.rglob("*_results.json")):
        where = _relative(path, log_dir)
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            warnings.append(f"{where}: skipped, not UTF-8 text ({err.reason} at byte {err.start})")
            continue
        except json.JSONDecodeError as err:
            warnings.append(f"{where}: skipped, not JSON ({err.msg}, line {err.lineno})")
            continue
        except OSError as err:
            warnings.append(f"{where}: skipped, cannot read it ({err.strerror})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            warnings.append(f"{where}: skipped, not an lmms-eval results file (no \"results\" object)")
            continue
        try:
            result = parse_result_file(path, data)
        except (TypeError, ValueError, AttributeError) as err:
            warnings.append(f"{where}: skipped, unexpected content ({err})")
            continue
        result.digest = hashlib.sha256(raw).hexdigest()
        for what in result.non_finite:
            warnings.append(f"{where}: {what} is not a finite number (lmms-eval wrote NaN / inf); left out of the table")
        found.append(result)
    return found


def parse_result_file(path: Path, data: dict) -> ResultFile:
    """The `ResultFile` of `path`, whose JSON is `data`."""
    config = data.get("config") or {}
    cli = config.get("resolved_cli_args") or {}
    model_args = str(config.get("model_args") or cli.get("model_args") or "")
    model = data.get("model_name") or model_name_from_args(model_args) or str(config.get("model") or "?")
    groups = {name: list(tasks) for name, tasks in (data.get("group_subtasks") or {}).items()}
    tasks = {}
    non_finite: list[str] = []
    for name, metrics in data["results"].items():
        if not isinstance(metrics, dict) or (name in groups and groups[name]):
            continue
        values = {key: value for key, value in metrics.items() if is_number(value) and "_stderr" not in key}
        non_finite += [f"{name} {key.split(',')[0]}" for key, value in metrics.items()
                       if isinstance(value, float) and not math.isfinite(value) and "_stderr" not in key]  # fmt: skip
        if values:
            tasks[name] = values
    date = str(data.get("date") or path.name.split("_results.json")[0])
    n_samples = {name: int(value["effective"]) for name, value in (data.get("n-samples") or {}).items()
                 if isinstance(value, dict) and isinstance(value.get("effective"), int)}  # fmt: skip
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
        n_samples=n_samples,
        non_finite=non_finite,
    )


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


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
