"""End to end on CPU, the way CI and `make demo` run it: `run_OTPrune.sh --smoke` makes a tiny
random checkpoint, runs lmms-eval's own CLI (`--model llava`, task otprune_smoke) unpruned and with
BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098, then `otprune report`.

About 70 s on 2 CPU cores (two lmms-eval processes; most of it is lmms-eval's start-up)."""

import csv
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from eval_fakes import has_row

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 3

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llava") is None or importlib.util.find_spec("llava.model.builder") is None,
    reason="the llava package is not available yet",
)


def records_of(folder: Path) -> list[dict]:
    lines = []
    for path in sorted(folder.rglob("otprune_records_*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("smoke")
    env = {key: value for key, value in os.environ.items()
           if key not in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_RECORDS", "MODELS", "TASKS", "LOG_DIR")}
    env["HF_DATASETS_CACHE"] = str(log_dir / "hf_datasets")
    result = subprocess.run(
        ["bash", str(ROOT / "run_OTPrune.sh"), "--smoke", "--log-dir", str(log_dir), "--limit", str(LIMIT),
         "--", "--gen_kwargs", "max_new_tokens=2"],
        capture_output=True, text=True, env=env, cwd=log_dir,
    )
    assert result.returncode == 0, result.stdout[-4000:] + "\n" + result.stderr[-4000:]
    return log_dir, result.stdout


def run_dir(log_dir: Path, setting: str) -> Path:
    (model,) = log_dir.glob("tiny-llava-*")  # the checkpoint's folder: its name + a hash of its full path
    return model / setting / f"otprune_smoke_limit{LIMIT}"


def test_results_files_exist(smoke):
    log_dir, _ = smoke
    for setting in ("original", "ours_r0.098_l0"):
        (results,) = run_dir(log_dir, setting).rglob("*_results.json")
        data = json.loads(results.read_text())
        assert "exact_match,none" in data["results"]["otprune_smoke_gen"]
        assert "acc,none" in data["results"]["otprune_smoke_mc"]
        assert {p.name.split("_samples_")[1] for p in results.parent.glob("*_samples_*.jsonl")} == {
            "otprune_smoke_gen.jsonl", "otprune_smoke_mc.jsonl"}


def test_records_pruned_samples_use_k_visual_tokens(smoke):
    log_dir, _ = smoke
    pruned = records_of(run_dir(log_dir, "ours_r0.098_l0"))
    unpruned = records_of(run_dir(log_dir, "original"))
    assert pruned and unpruned, (
        "no otprune records next to the lmms-eval results: the llava model's on_pruning_stats hook "
        "must call otprune.eval.records.record(stats, config=self.config)"
    )
    # LIMIT generation docs + one loglikelihood request per option of the LIMIT multiple-choice docs.
    assert len(pruned) == len(unpruned) >= LIMIT
    for record in pruned:
        assert record["method"] == "otprune" and record["layer"] == 0 and record["ratio"] == 0.098
        per_image = record.get("image_tokens_before", [record["visual_tokens_before"]])
        expected = sum(max(1, int(round(0.098 * n))) for n in per_image)
        assert record["visual_tokens_after"] == expected < record["visual_tokens_before"]
        assert record["seq_len_after"] == record["seq_len_before"] - (record["visual_tokens_before"] - expected)
        assert record["tflops"] < record["tflops_unpruned"]
    for record in unpruned:
        assert record["method"] is None
        assert record["visual_tokens_after"] == record["visual_tokens_before"]
        assert record["tflops"] == record["tflops_unpruned"]
    mean = lambda rows: sum(r["tflops"] for r in rows) / len(rows)  # noqa: E731
    assert mean(pruned) < mean(unpruned)


def test_report_builds_the_table(smoke):
    log_dir, stdout = smoke
    markdown = (log_dir / "otprune_report.md").read_text()
    assert has_row(markdown, "tiny-llava", "Original", "–", "100%")
    assert has_row(markdown, "tiny-llava", "OTPrune", "0", "9.8%")
    assert "Smoke EM" in markdown and "Smoke MC Acc" in markdown
    assert has_row(stdout, "Model", "Method")  # the table is printed
    rows = {row["method"]: row for row in csv.DictReader((log_dir / "otprune_report.csv").open())}
    assert float(rows["OTPrune"]["tflops"]) < float(rows["Original"]["tflops"])
    assert float(rows["OTPrune"]["select_ms"]) > 0


@pytest.fixture(scope="module")
def adaptive_smoke(tmp_path_factory):
    """`run_OTPrune.sh --smoke --methods PRUMERGE,OURS_STAR`: Table 1's adaptive rows on the tiny checkpoint."""
    log_dir = tmp_path_factory.mktemp("smoke_adaptive")
    env = {key: value for key, value in os.environ.items()
           if key not in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_RECORDS", "MODELS", "TASKS", "LOG_DIR",
                          "METHODS", "RATIOS")}
    env["HF_DATASETS_CACHE"] = str(log_dir / "hf_datasets")
    result = subprocess.run(
        ["bash", str(ROOT / "run_OTPrune.sh"), "--smoke", "--methods", "PRUMERGE,OURS_STAR", "--log-dir", str(log_dir),
         "--limit", str(LIMIT), "--", "--gen_kwargs", "max_new_tokens=2"],
        capture_output=True, text=True, env=env, cwd=log_dir,
    )
    assert result.returncode == 0, result.stdout[-4000:] + "\n" + result.stderr[-4000:]
    return log_dir, result.stdout


def test_adaptive_rows_end_to_end(adaptive_smoke):
    log_dir, stdout = adaptive_smoke
    for setting in ("prumerge_riqr_l0", "ours_star_riqr_l0"):
        records = records_of(run_dir(log_dir, setting))
        assert records and all(r["ratio"] == "iqr" for r in records)
        kept = [r["visual_tokens_after"] for r in records]
        assert min(kept) >= 1 and max(kept) < 16  # per-image IQR counts (+ PruMerge's summary token) of 16 patches
    markdown = (log_dir / "otprune_report.md").read_text()
    assert has_row(markdown, "tiny-llava", "PruMerge", "0") and has_row(markdown, "tiny-llava", "OTPrune*", "0")
    rows = [line for line in markdown.splitlines() if line.startswith("| tiny-llava")]
    assert len(rows) == 2 and all(" tok (" in row and "Variable: " in row for row in rows)
