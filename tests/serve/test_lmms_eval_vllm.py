"""lmms-eval's `--model vllm` through `run_OTPrune.sh --engine vllm`, end to end on CPU: the tiny vLLM
checkpoint, the local task otprune_smoke_gen (2 documents), OTPrune at ratio 0.25. The engine runs in
vLLM's own processes (the real setting: the plugin's processor emits the stats in lmms-eval's process,
the model prunes in the worker); the records show K = round(0.25 * 64) = 16 placeholders per image, and
`otprune report` has the row. Serve venv with lmms-eval (`make test-serve`)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAVE_VLLM, SKIP_REASON, SWITCHES

pytestmark = [
    pytest.mark.skipif(not HAVE_VLLM, reason=SKIP_REASON),
    pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed in this venv"),
]

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 64  # the tiny checkpoint: 112 px crop, 14 px patches
RATIO = 0.25


def run_script(model: str, logs: Path) -> None:
    """`run_OTPrune.sh --engine vllm` on `model`: otprune_smoke_gen, 2 documents, OURS at `RATIO`, logs in `logs`."""
    env = {key: value for key, value in os.environ.items()
           if key not in (*SWITCHES, "VLLM_ENABLE_V1_MULTIPROCESSING", "OTPRUNE_RECORDS", "OTPRUNE_RUN_ID", "PYTHON")}
    env.update(PYTHON=sys.executable, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        ["bash", str(ROOT / "run_OTPrune.sh"), "--engine", "vllm", "--python", sys.executable, "--models", model,
         "--tasks", "otprune_smoke_gen", "--limit", "2", "--methods", "OURS", "--ratios", str(RATIO),
         "--model-args", "enforce_eager=True,max_model_len=1024,dtype=float32", "--log-dir", str(logs)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_run_script_engine_vllm(tiny_llava, tmp_path):
    logs = tmp_path / "logs"
    run_script(tiny_llava, logs)

    files = list(logs.rglob("otprune_records_*.jsonl"))
    assert len(files) == 1, files  # written by lmms-eval's process only (not vLLM's engine processes)
    spec_line, *lines, end = [json.loads(line) for line in files[0].read_text().splitlines()]
    spec = spec_line["spec"]  # what the evaluating process says it ran
    assert (spec["lmms_model"], spec["engine"], spec["method"]) == ("vllm", "vllm", "otprune")
    assert (dict(spec["settings"])["layer"], dict(spec["settings"])["ratio"]) == (0, RATIO)
    assert end["otprune_end"] and end["requests"] == 2 == end["records"] and end["results"]
    assert len(lines) == 2
    keep = round(RATIO * TOKENS)
    for record in lines:
        assert (record["visual_tokens_before"], record["visual_tokens_after"]) == (TOKENS, keep)
        assert record["image_tokens_after"] == [keep]
        assert record["seq_len_after"] == record["text_tokens"] + keep and record["text_tokens"] > 0
        assert (record["method"], record["layer"], record["ratio"], record["gamma"]) == ("otprune", 0, RATIO, 0.01)
        assert record["run_id"] == spec_line["run_id"]
        assert record["prefill_ms"] is None and record["select_ms"] is None  # not measured under vLLM
        assert record["num_layers"] == 2 and 0 < record["tflops"] < record["tflops_unpruned"]

    with open(logs / "otprune_report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["model_id"], row["method"], row["layer"], float(row["ratio"])) == (
        f"local:{os.path.realpath(tiny_llava)}", "OTPrune", "0", RATIO)
    assert row["otprune_smoke_gen:exact_match"] != "" and row["samples"] == "2"
    assert float(row["tflops_percent"]) < 100


@pytest.mark.parametrize("family", ["internvl", "gemma3"])
def test_run_script_engine_vllm_newer_families(family, tiny_internvl, tiny_gemma3, tmp_path):
    """The same path for a transformers-format InternVL and a Gemma 3 (routed by their config's model_type):
    each image keeps round(0.25 * T) of its T tokens (InternVL: 16 x tiles, Gemma 3: 16), one record per
    document, and the report has the row."""
    logs = tmp_path / "logs"
    run_script({"internvl": tiny_internvl, "gemma3": tiny_gemma3}[family], logs)
    (records,) = list(logs.rglob("otprune_records_*.jsonl"))
    spec_line, *lines, end = [json.loads(line) for line in records.read_text().splitlines()]
    assert spec_line["spec"]["lmms_model"] == "vllm" and end["requests"] == 2 == end["records"]
    for record in lines:
        (before,), (after,) = record["image_tokens_before"], record["image_tokens_after"]
        assert before % 16 == 0 and after == round(RATIO * before) < before
        assert record["seq_len_after"] == record["text_tokens"] + after and record["text_tokens"] > 0
    with open(logs / "otprune_report.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["method"] == "OTPrune" and row["samples"] == "2"
