"""What an evaluating process proves about its run, read back from its records file.

Every lmms-eval process that runs a model through otprune's entry point writes one JSONL file
(`otprune.eval.records`) beside lmms-eval's results:

    first line   {"otprune_spec": 1, "spec": RunSpec, "run_id", "run", "rank", "world_size", ...}
    per prefill  {"otprune_record": 1, "method", "layer", "ratio", ..., "visual_tokens_before/after"}
    last line    {"otprune_end": 1, "requests", "documents": {task: n}, "records", "results": [sha256]}

A run (one `run_id`, one process per rank) is *verified* when its files prove what the row will
say (`verify`):

- every rank wrote its spec line and its closing line, all with the same spec;
- the process counted the requests lmms-eval gave the model (the entry point wrapped it), and
  wrote exactly one record per request;
- every record is the spec's pruning (method, layer, ratio and every parameter) with at most as
  many visual tokens after as before, or, for an unpruned spec, no pruning at all;
- rank 0 names (by sha256) the lmms-eval results file it wrote, that file is there, and its
  number of documents per task equals the documents the processes counted.

Anything else is unverified, with the reason; the report keeps such runs out of every table,
figure and test, and the runner fails them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from otprune.eval.records import (
    END_MARKER,
    RECORD_MARKER,
    SPEC_MARKER,
    json_lines,
    normalized_settings,
    setting_keys,
)
from otprune.eval.runspec import RunSpec


@dataclasses.dataclass
class Process:
    """The lines one process wrote (one file, one `run`)."""

    file: Path
    run: str
    start: dict | None = None
    end: dict | None = None
    records: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunEvidence:
    """The processes of one run (same `run_id`; a process without an id is a run of its own)."""

    run_id: str | None
    processes: list[Process]

    @property
    def files(self) -> list[Path]:
        return sorted({process.file for process in self.processes})

    @property
    def records(self) -> list[dict]:
        return [record for process in self.processes for record in process.records]

    @property
    def spec(self) -> RunSpec | None:
        """The spec the processes wrote (None when none did, or it does not parse)."""
        for process in self.processes:
            if process.start is not None:
                try:
                    return RunSpec.from_dict(process.start.get("spec"))
                except ValueError:
                    return None
        return None

    @property
    def results_digests(self) -> list[str]:
        return [str(item.get("sha256")) for process in self.processes if process.end
                for item in process.end.get("results") or () if isinstance(item, Mapping)]  # fmt: skip

    @property
    def name(self) -> str:
        return self.run_id or (self.processes[0].run if self.processes else "?")


def read_processes(path: Path, warnings: list[str], where: object = None) -> list[Process]:
    """The processes of one records file; a foreign or unreadable file, or a bad line, is skipped with
    a warning naming it (appended to `warnings`)."""
    where = path if where is None else where
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        warnings.append(f"{where}: skipped, not UTF-8 text ({err.reason} at byte {err.start}); not a records file")
        return []
    except OSError as err:
        warnings.append(f"{where}: skipped, cannot read it ({err.strerror})")
        return []
    processes: dict[str, Process] = {}
    first = True
    for number, value in json_lines(text.splitlines()):
        kind = _kind(value)
        if kind is None:
            what = f"line {number} is not JSON ({value.msg})" if isinstance(value, json.JSONDecodeError) else \
                f"line {number} is not one of ours"
            if first:
                warnings.append(f"{where}: skipped, {what}; not a records file")
                return []
            warnings.append(f"{where}:{number}: line skipped, {what} (cut short?)")
            continue
        first = False
        if kind == RECORD_MARKER:
            problem = record_problem(value)
            if problem is not None:
                warnings.append(f"{where}:{number}: record skipped, {problem}")
                continue
        run = str(value.get("run") or path)
        process = processes.setdefault(run, Process(path, run))
        if kind == SPEC_MARKER:
            process.start = value
        elif kind == END_MARKER:
            process.end = value
        else:
            process.records.append(value)
    return list(processes.values())


def scan(root: Path, warnings: list[str]) -> list[RunEvidence]:
    """Every run whose records lie under `root`, grouped by run id."""
    runs: dict[str, list[Process]] = {}
    for path in sorted(root.rglob("*.jsonl")):
        if "_samples_" in path.name and not path.name.startswith("otprune_records"):
            continue  # lmms-eval's --log_samples files
        where = _relative(path, root)
        for process in read_processes(path, warnings, where):
            run_id = _run_id(process)
            key = f"id:{run_id}" if run_id is not None else f"file:{path}\0{process.run}"
            runs.setdefault(key, []).append(process)
    return [RunEvidence(_run_id(processes[0]), processes) for processes in runs.values()]


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def verify(run: RunEvidence, results: Mapping[str, object], root: Path | None = None) -> list[str]:
    """Why `run` does not prove its row (empty when it does). `results`: sha256 -> the parsed lmms-eval
    results file (`otprune.eval.report.collect.ResultFile`) with that content."""
    problems: list[str] = []
    files = ", ".join(str(_relative(path, root)) for path in run.files)
    started = [p for p in run.processes if p.start is not None]
    if not started:
        return [f"no spec line in {files}: written by an older otprune, or not by an lmms-eval process"]
    spec = run.spec
    if spec is None:
        return [f"{files}: its spec line does not parse"]
    digests = {p.start.get("spec_digest") for p in started}
    if len(digests) > 1:
        problems.append(f"its processes disagree on the spec ({files})")
    world = max(int(p.start.get("world_size") or 1) for p in started)
    if len(started) < world:
        problems.append(f"{len(started)} of {world} processes wrote records")
    for process in run.processes:
        where = _relative(process.file, root)
        if process.start is None:
            problems.append(f"{where}: records without a spec line")
            continue
        if process.end is None:
            problems.append(f"{where}: no closing line: the process did not finish (killed, or it crashed)")
            continue
        requests = process.end.get("requests")
        if requests is None:
            problems.append(
                f"{where}: no request accounting: lmms-eval did not run the model through otprune's "
                "lmms_eval.models entry point (was it skipped after a broken entry point of another package?)"
            )
            continue
        if len(process.records) != requests:
            problems.append(f"{where}: {requests} requests but {len(process.records)} records: "
                            "not every request went through otprune")
    problems += _setting_problems(spec, run.records)
    result = next((results[d] for d in run.results_digests if d in results), None)
    if result is None:
        problems.append("no lmms-eval results file written by this run (lmms-eval failed, or the file changed)")
    else:
        problems += _document_problems(run, result)
    return problems


def _setting_problems(spec: RunSpec, records: Sequence[dict]) -> list[str]:
    """Records whose pruning is not the spec's."""
    if spec.method is None:
        pruned = [r for r in records if r.get("method") is not None]
        return [f"{len(pruned)} of {len(records)} records are pruned ({pruned[0].get('method')}) "
                "but the run's spec is unpruned"] if pruned else []  # fmt: skip
    want = normalized_settings({**spec.settings_dict, "method": spec.method, "recipe": None})
    wrong = 0
    first = None
    for record in records:
        values = {key: record.get(key) for key in want}
        values["recipe"] = None
        try:
            got = normalized_settings(values)
        except (TypeError, ValueError):
            got = None
        before, after = record.get("visual_tokens_before"), record.get("visual_tokens_after")
        if got != want or not isinstance(before, int) or not isinstance(after, int) or after > before:
            wrong += 1
            first = first or {k: record.get(k) for k in ("method", "layer", "ratio", "visual_tokens_before",
                                                          "visual_tokens_after")}
    if wrong:
        return [f"{wrong} of {len(records)} records do not show the spec's pruning ({spec.method}); first: {first}"]
    return []


def _document_problems(run: RunEvidence, result) -> list[str]:
    """lmms-eval's document counts against the ones the processes counted."""
    counted: dict[str, int] = {}
    for process in run.processes:
        for task, n in ((process.end or {}).get("documents") or {}).items():
            counted[task] = counted.get(task, 0) + int(n)
    samples = getattr(result, "n_samples", None) or {}
    problems = []
    for task, effective in samples.items():
        if counted.get(task) != effective:
            problems.append(f"lmms-eval evaluated {effective} documents of {task}, the records account for "
                            f"{counted.get(task, 0)}")
    return problems


_NUMBER_FIELDS = ("time", "tflops", "tflops_unpruned")  # must be finite numbers
_OPTIONAL_NUMBER_FIELDS = ("prefill_ms", "select_ms", "peak_memory_mb")  # finite numbers or null


def record_problem(record: dict) -> str | None:
    """Why `record` cannot be used (a field the report reads is missing or invalid), else None."""
    for name in _NUMBER_FIELDS:
        value = record.get(name)
        if not _is_number(value) or not math.isfinite(float(value)):
            return f"field {name!r} is {value!r}; must be a finite number"
    for name in _OPTIONAL_NUMBER_FIELDS:
        value = record.get(name)
        if value is not None and (not _is_number(value) or not math.isfinite(float(value))):
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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return None
    for marker in (SPEC_MARKER, END_MARKER, RECORD_MARKER):
        if value.get(marker) is not None:
            return marker
    return None


def _run_id(process: Process) -> str | None:
    for line in (process.start, process.end, *process.records[:1]):
        if line and line.get("run_id") is not None:
            return str(line["run_id"])
    return None


def _relative(path: Path, root: Path | None) -> Path:
    if root is None:
        return path
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def broken_entry_points(group: str = "lmms_eval.models") -> list[str]:
    """The entry points of `group` that fail to load, as "name (distribution): error"; lmms-eval stops
    at the first one, skipping the rest (ours included)."""
    from importlib import metadata

    broken = []
    for entry in metadata.entry_points(group=group):
        try:
            entry.load()
        except Exception as err:  # any failure makes lmms-eval skip the remaining entry points
            dist = getattr(getattr(entry, "dist", None), "name", "?")
            broken.append(f"{entry.name} = {entry.value} ({dist}): {type(err).__name__}: {err}")
    return broken


def summary(runs: Iterable[RunEvidence]) -> str:
    return ", ".join(run.name for run in runs)
