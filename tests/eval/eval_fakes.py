"""Builders of fake lmms-eval 0.7.3 outputs and OTPrune records, in the exact on-disk layout:

    <output_path>/<sanitized model>/<date>_results.json
    <output_path>/<sanitized model>/<date>_samples_<task>.jsonl
    <output_path>/<sanitized model>/otprune_records_<stamp>_r0_<pid>.jsonl   (ours)

`write_records` writes what an evaluating process writes (`otprune.eval.evidence`): the spec line,
one record per request, and the closing line naming the results file; by default a complete,
verified run of the results file beside it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from zoneinfo import ZoneInfo

from otprune import flops
from otprune.eval.records import (
    END_MARKER,
    SPEC_MARKER,
    RecordWriter,
    normalized_settings,
    sanitize_model_name,
    setting_keys,
)
from otprune.eval.runspec import RunSpec, installed_versions, model_identity

TIMEZONE = "Asia/Singapore"


def date_string(epoch: float, timezone: str = TIMEZONE) -> str:
    return datetime.datetime.fromtimestamp(epoch, ZoneInfo(timezone)).strftime("%Y%m%d_%H%M%S")


def write_results(
    output_path: Path,
    model: str,
    metrics: dict[str, dict[str, float]],
    *,
    start: float,
    groups: dict[str, list[str]] | None = None,
    cli_tasks: str | None = None,
    model_args: str | None = None,
    higher_is_better: dict | None = None,
    documents: int = 10,
) -> Path:
    """A results file as lmms-eval 0.7.3 writes it (only the keys the report may use, plus some others)."""
    model_args = model_args if model_args is not None else f"pretrained={model}"
    folder = Path(output_path) / sanitize_model_name(model)
    folder.mkdir(parents=True, exist_ok=True)
    date = date_string(start)
    results = {}
    for group in groups or {}:
        results[group] = {" ": " ", "alias": group}
    for task, values in metrics.items():
        entry = {"alias": task if not groups else f" - {task}"}
        for name, value in values.items():
            entry[f"{name},none"] = value
            entry[f"{name}_stderr,none"] = "N/A"
        results[task] = entry
    data = {
        "results": results,
        "group_subtasks": groups or {task: [] for task in metrics},
        "configs": {task: {"task": task} for task in metrics},
        "versions": {task: 0.1 for task in metrics},
        "n-shot": {task: 0 for task in metrics},
        "higher_is_better": higher_is_better or {task: {name: True for name in values} for task, values in metrics.items()},
        "n-samples": {task: {"original": documents, "effective": documents} for task in metrics},
        "config": {
            "model": "llava",
            "model_args": model_args,
            "batch_size": "1",
            "limit": None,
            "resolved_cli_args": {
                "model": "llava",
                "tasks": cli_tasks or ",".join(metrics),
                "model_args": model_args,
                "output_path": str(output_path),
                "timezone": TIMEZONE,
                "limit": None,
            },
        },
        "git_hash": "abc",
        "date": date,
        "model_name": model,
        "model_name_sanitized": sanitize_model_name(model),
        "start_time": 12.5,
        "end_time": 99.0,
    }
    path = folder / f"{date}_results.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    for task in metrics:
        (folder / f"{date}_samples_{task}.jsonl").write_text(
            json.dumps({"doc_id": 0, "target": "x", "filtered_resps": ["y"], "exact_match": 0.0}) + "\n", encoding="utf-8"
        )
    return path


def stats(text: int, visual: int, *, method: str | None, ratio: float | None, layer: int | None = 0,
          prefill_ms: float = 10.0, select_ms: float | None = 1.0) -> dict:
    """Per-sample pruning stats as the llava model reports them."""
    kept = visual if method is None or ratio is None else visual - int(round((1 - ratio) * visual))
    return {
        "method": method,
        "layer": layer if method is not None else None,
        "ratio": ratio if method is not None else None,
        "visual_tokens_before": visual,
        "visual_tokens_after": kept,
        "seq_len_before": text + visual,
        "seq_len_after": text + kept,
        "text_tokens": text,
        "select_ms": select_ms if method is not None else None,
        "prefill_ms": prefill_ms,
    }


def fake_spec(model: str, sample: dict, tasks: str, **fields) -> RunSpec:
    """The RunSpec an lmms-eval process running `model` with `sample`'s setting writes (`fields` override)."""
    settings = normalized_settings({key: sample.get(key) for key in setting_keys()})
    method = settings.pop("method")
    values = dict(model=model_identity(model), engine="hf", lmms_model="llava", model_args=(), batch_size="1",
                  limit=None, task=tasks, extra_args=(), method=method,
                  settings=tuple(sorted(settings.items())) if method else (), distance="eq4" if method else None,
                  versions=tuple(sorted(installed_versions().items())))  # fmt: skip
    values.update(fields)
    return RunSpec(**values)


def write_records(output_path: Path, model: str, samples: list[dict], *, time: float, tasks: str,
                  size: flops.DecoderSize = flops.MODEL_SIZES["7b"], run: str | None = None,
                  run_id: str | None = None, results: Path | None = None, closed: bool = True,
                  accounted: bool = True, spec: RunSpec | None = None) -> Path:
    """Our records file for one run, as the evaluating process writes it: its spec line, the records
    (with the real RecordWriter, times forced to `time`), and (`closed`) its closing line, which counts
    one request per sample (`accounted`) and names `results` (default: the newest results file in the
    folder) with that file's documents. The defaults make a verified run."""
    folder = Path(output_path) / sanitize_model_name(model)
    path = folder / f"otprune_records_{date_string(time)}_r0_{abs(hash(run or str(time))) % 100000}.jsonl"
    writer = RecordWriter(path, context={"output_path": str(output_path), "model_args": f"pretrained={model}",
                                         "tasks": tasks, "limit": None}, run_id=run_id)
    if run is not None:
        writer.run = run
    records = writer.write(samples, hidden=size.hidden, intermediate=size.intermediate, layers=size.layers, model=model)
    spec = spec or fake_spec(model, samples[0] if samples else {}, tasks)
    head = {SPEC_MARKER: 1, "run_id": run_id, "run": writer.run, "rank": 0, "world_size": 1, "time": time,
            "spec": spec.to_dict(), "spec_digest": spec.digest}  # fmt: skip
    if results is None:
        found = sorted(folder.glob("*_results.json"))
        results = found[-1] if found else None
    documents = {}
    named = []
    if results is not None:
        data = json.loads(results.read_bytes())
        documents = {task: value["effective"] for task, value in (data.get("n-samples") or {}).items()}
        named = [{"name": results.name, "sha256": hashlib.sha256(results.read_bytes()).hexdigest()}]
    tail = {END_MARKER: 1, "run_id": run_id, "run": writer.run, "rank": 0, "world_size": 1, "time": time + 1,
            "records": len(records), "requests": len(records) if accounted else None,
            "request_types": {"generate_until": len(records)} if accounted else None,
            "documents": documents, "results": named}  # fmt: skip
    # Rewrite with the forced time (the writer stamps the wall clock).
    with open(path, "w", encoding="utf-8") as out:
        out.write(json.dumps(head) + "\n")
        for record in records:
            record["time"] = time
            out.write(json.dumps(record) + "\n")
        if closed:
            out.write(json.dumps(tail) + "\n")
    return path


def table_rows(markdown: str) -> list[list[str]]:
    """The stripped cells of every line of the pipe tables in `markdown` (the header too, not the rule)."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(cell and set(cell) <= set(":-") for cell in cells):
                rows.append(cells)
    return rows


def has_row(markdown: str, *cells: str) -> bool:
    """True when a line of a table in `markdown` starts with `cells`."""
    return any(row[: len(cells)] == list(cells) for row in table_rows(markdown))
