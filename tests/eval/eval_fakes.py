"""Builders of fake lmms-eval 0.7.3 outputs and OTPrune records, in the exact on-disk layout:

    <output_path>/<sanitized model>/<date>_results.json
    <output_path>/<sanitized model>/<date>_samples_<task>.jsonl
    <output_path>/<sanitized model>/otprune_records_<stamp>_r0_<pid>.jsonl   (ours)
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from zoneinfo import ZoneInfo

from otprune import flops
from otprune.eval.records import RecordWriter, sanitize_model_name

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
    run_id: str | None = None,
) -> Path:
    """A results file as lmms-eval 0.7.3 writes it (only the keys the report may use, plus some others);
    with `run_id`, run_OTPrune.sh's otprune_run.json of that call in `output_path`."""
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
        "n-samples": {task: {"original": 10, "effective": 10} for task in metrics},
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
    if run_id is not None:
        (Path(output_path) / "otprune_run.json").write_text(json.dumps({"otprune_run": 3, "run_id": run_id, "model": model}))
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


def write_records(output_path: Path, model: str, samples: list[dict], *, time: float, tasks: str,
                  size: flops.DecoderSize = flops.MODEL_SIZES["7b"], run: str | None = None,
                  run_id: str | None = None) -> Path:
    """Our records file for one run, written with the real RecordWriter (times forced to `time`)."""
    folder = Path(output_path) / sanitize_model_name(model)
    path = folder / f"otprune_records_{date_string(time)}_r0_{abs(hash(run or str(time))) % 100000}.jsonl"
    writer = RecordWriter(path, context={"output_path": str(output_path), "model_args": f"pretrained={model}",
                                         "tasks": tasks, "limit": None}, run_id=run_id)
    if run is not None:
        writer.run = run
    records = writer.write(samples, hidden=size.hidden, intermediate=size.intermediate, layers=size.layers, model=model)
    # Rewrite with the forced time (the writer stamps the wall clock).
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            record["time"] = time
            out.write(json.dumps(record) + "\n")
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
