"""Reading a log folder: lmms-eval's results files, our record runs, which run belongs to which
results file, and the settings of a run (from its records, else run_OTPrune.sh's otprune_run.json).

Records and results are joined by the run's identity, never by time: run_OTPrune.sh gives each
lmms-eval call an id (`OTPRUNE_RUN_ID`), written into every record and into the otprune_run.json of
the call's own folder; a results file belongs to the id of the nearest otprune_run.json above it.
Records without an id (lmms-eval run by hand) are joined only when that is unambiguous: their
folder holds exactly one results file covering their tasks and every id-less record group there
has the same setting. Anything else is left out with a note.

A file that cannot be read (not UTF-8, not JSON, not ours) or a record line with an invalid field
is skipped with a warning naming it (and the line): `warnings`, which the report shows in its notes
and prints on stderr.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from otprune.eval.records import (
    RECORD_MARKER,
    is_record,
    json_lines,
    model_name_from_args,
    normalized_settings,
    setting_keys,
)
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
    run_id: str | None = None  # the run_OTPrune.sh call that wrote it (its otprune_run.json), else None

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
    def run_id(self) -> str | None:
        """The lmms-eval call (`OTPRUNE_RUN_ID`) these records were written under, or None."""
        value = self.field("run_id")
        return None if value is None else str(value)

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


def find_result_files(log_dir: Path, warnings: list[str] | None = None) -> list[ResultFile]:
    """Every lmms-eval results file under `log_dir`; a file that is not one is skipped with a warning
    (appended to `warnings`)."""
    warnings = [] if warnings is None else warnings
    found = []
    for path in sorted(log_dir.rglob("*_results.json")):
        where = _relative(path, log_dir)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
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
        result.run_id = run_id_of(path.parent, log_dir)
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


def find_record_runs(log_dir: Path, warnings: list[str] | None = None) -> list[RecordRun]:
    """Every group of per-sample records under `log_dir` (JSONL files whose lines are records); a file
    that is not a records file, and a record line with an invalid field, is skipped with a warning."""
    warnings = [] if warnings is None else warnings
    runs: dict[str, RecordRun] = {}
    for path in sorted(log_dir.rglob("*.jsonl")):
        if "_samples_" in path.name and not path.name.startswith("otprune_records"):
            continue  # lmms-eval's --log_samples files
        for value in _scan_records(path, _relative(path, log_dir), warnings):
            run_id = str(value.get("run") or path)
            run = runs.setdefault(f"{path}\0{run_id}", RecordRun(run_id, set(), []))
            run.files.add(path)
            run.records.append(value)
    return list(runs.values())


def _scan_records(path: Path, where: Path, warnings: list[str]):
    """The valid records of one JSONL file; warnings for a foreign / unreadable file and invalid lines.

    A line cut short (not JSON) is skipped with a warning; a file whose first line is not a record
    (not JSON, or JSON without the record marker) is not a records file: skipped whole."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        warnings.append(f"{where}: skipped, not UTF-8 text ({err.reason} at byte {err.start}); not a records file")
        return
    except OSError as err:
        warnings.append(f"{where}: skipped, cannot read it ({err.strerror})")
        return
    first = True
    for number, value in json_lines(text.splitlines()):
        if isinstance(value, json.JSONDecodeError):
            if first:
                warnings.append(f"{where}: skipped, line {number} is not JSON ({value.msg}); not a records file")
                return
            warnings.append(f"{where}:{number}: line skipped, not JSON ({value.msg}; cut short?)")
            continue
        if not is_record(value):
            if first:
                warnings.append(f"{where}: skipped, not a records file (line {number} has no {RECORD_MARKER!r} marker)")
                return
            warnings.append(f"{where}:{number}: line skipped, not a record (no {RECORD_MARKER!r} marker)")
            continue
        first = False
        problem = record_problem(value)
        if problem is not None:
            warnings.append(f"{where}:{number}: record skipped, {problem}")
            continue
        yield value


_NUMBER_FIELDS = ("time", "tflops", "tflops_unpruned")  # must be finite numbers
_OPTIONAL_NUMBER_FIELDS = ("prefill_ms", "select_ms", "peak_memory_mb")  # finite numbers or null


def record_problem(record: dict) -> str | None:
    """Why `record` cannot be used (a field the report reads is missing or invalid), else None."""
    for name in _NUMBER_FIELDS:
        value = record.get(name)
        if not is_number(value) or not math.isfinite(float(value)):
            return f"field {name!r} is {value!r}; must be a finite number"
    for name in _OPTIONAL_NUMBER_FIELDS:
        value = record.get(name)
        if value is not None and (not is_number(value) or not math.isfinite(float(value))):
            return f"field {name!r} is {value!r}; must be a finite number or null"
    for name in ("run", "run_id", "tasks", "method"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"field {name!r} is {value!r}; must be a string or null"
    settings = {key: record.get(key) for key in setting_keys()}
    try:
        normalized_settings(settings)
    except (TypeError, ValueError) as err:
        for key in [key for key in setting_keys() if key != "method"]:  # the field without which the setting reads
            try:
                normalized_settings({**settings, key: None})
            except (TypeError, ValueError):
                continue
            return f"field {key!r} is {settings[key]!r}; not a valid {key} ({err})"
        return f"invalid setting ({err})"
    return None


def associate(results: Sequence[ResultFile], runs: Sequence[RecordRun]) -> tuple[dict[Path, list[RecordRun]], list[RecordRun]]:
    """Match each record run to its results file by the run's identity: {results path: [runs]}, and the
    unmatched runs (see the module doc: by run id, else only when the folder leaves no doubt)."""
    matched: dict[Path, list[RecordRun]] = defaultdict(list)
    unmatched = []
    by_id: dict[str, list[ResultFile]] = defaultdict(list)
    for result in results:
        if result.run_id is not None:
            by_id[result.run_id].append(result)
    anonymous: dict[Path, list[RecordRun]] = defaultdict(list)  # folder -> id-less record runs
    for run in runs:
        if run.run_id is None:
            for folder in run.folders:
                anonymous[folder].append(run)
    for run in runs:
        if run.run_id is not None:
            candidates = _covering(run, by_id.get(run.run_id, []))
        else:
            candidates = _covering(run, [result for result in results if result.folder in run.folders])
            neighbours = {tuple(other.settings().values()) for folder in run.folders for other in anonymous[folder]}
            if len(neighbours) > 1:
                candidates = []  # id-less records of different settings share the folder: no way to tell
        if len(candidates) == 1:
            matched[candidates[0].path].append(run)
        else:
            unmatched.append(run)
    return dict(matched), unmatched


def _covering(run: RecordRun, results: Sequence[ResultFile]) -> list[ResultFile]:
    """The results among `results` whose tasks include the run's `--tasks`."""
    tasks = run.field("tasks")
    if not tasks:
        return list(results)
    wanted = [name for name in str(tasks).split(",") if name]
    return [result for result in results if all(result.covers(name) for name in wanted)]


def run_id_of(folder: Path, root: Path) -> str | None:
    """The `run_id` of the nearest otprune_run.json between `folder` and `root`, else None."""
    for place in [folder, *folder.parents]:
        path = place / RUN_INFO
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("run_id")
            except (OSError, ValueError, AttributeError):
                return None
            return None if value is None else str(value)
        if place == root:
            break
    return None


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


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
