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
    """The per-sample records (not the spec / closing lines) under `folder`."""
    lines = []
    for path in sorted(folder.rglob("otprune_records_*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if "otprune_record" in line]


def clean_env(log_dir: Path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_RECORDS", "MODELS", "TASKS", "LOG_DIR",
                          "METHODS", "RATIOS", "PYTHONPATH")}
    env["HF_DATASETS_CACHE"] = str(log_dir / "hf_datasets")
    env.update(extra)
    return env


def smoke_run(log_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run_OTPrune.sh"), "--smoke", "--log-dir", str(log_dir), *args, "--",
                           "--gen_kwargs", "max_new_tokens=2"], capture_output=True, text=True,
                          env=env or clean_env(log_dir), cwd=log_dir)  # fmt: skip


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
    (folder,) = (model / setting).glob(f"otprune_smoke_limit{LIMIT}-*")  # the task + a hash of the run's spec
    return folder


def test_results_files_exist(smoke):
    log_dir, _ = smoke
    for setting in ("original", "otprune_r0.098_l0"):
        (results,) = run_dir(log_dir, setting).rglob("*_results.json")
        data = json.loads(results.read_text())
        assert "exact_match,none" in data["results"]["otprune_smoke_gen"]
        assert "acc,none" in data["results"]["otprune_smoke_mc"]
        assert {p.name.split("_samples_")[1] for p in results.parent.glob("*_samples_*.jsonl")} == {
            "otprune_smoke_gen.jsonl", "otprune_smoke_mc.jsonl"}


def test_records_pruned_samples_use_k_visual_tokens(smoke):
    log_dir, _ = smoke
    pruned = records_of(run_dir(log_dir, "otprune_r0.098_l0"))
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
    # Every loglikelihood forward (one per option of a multiple-choice document) names its document; the
    # generation forwards (one per document) do not need to.
    for rows in (pruned, unpruned):
        docs = [tuple(r["doc"]) for r in rows if r.get("doc") is not None]
        assert len(docs) == len(rows) - LIMIT and {task for task, _ in docs} == {"otprune_smoke_mc"}
        assert len(set(docs)) == LIMIT


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
    for setting in ("prumerge_riqr_l0", "otprune_riqr_l0"):
        records = records_of(run_dir(log_dir, setting))
        assert records and all(r["ratio"] == "iqr" for r in records)
        kept = [r["visual_tokens_after"] for r in records]
        assert min(kept) >= 1 and max(kept) < 16  # per-image IQR counts (+ PruMerge's summary token) of 16 patches
    markdown = (log_dir / "otprune_report.md").read_text()
    assert has_row(markdown, "tiny-llava", "PruMerge", "0") and has_row(markdown, "tiny-llava", "OTPrune*", "0")
    rows = [line for line in markdown.splitlines() if line.startswith("| tiny-llava")]
    assert len(rows) == 2 and all(" tok (" in row and "Variable: " in row for row in rows)


# ---------------------------------------------------------------- issue #21, through the real commands


def test_rows_of_another_limit_are_another_scope(smoke):
    """Case 2: `none --limit 3` and `OURS --limit 2` in one log folder: the pruned row is never divided by the
    unpruned score of other documents."""
    log_dir, _ = smoke
    result = smoke_run(log_dir, "--methods", "OURS", "--limit", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    markdown = (log_dir / "otprune_report.md").read_text()
    assert has_row(markdown, "tiny-llava [limit=2]", "OTPrune", "0", "9.8%")
    assert has_row(markdown, "tiny-llava [limit=3]", "Original") and has_row(markdown, "tiny-llava [limit=3]", "OTPrune")
    assert "tiny-llava [limit=2] / OTPrune: no unpruned run in its scope" in markdown
    rows = {(row["model"], row["method"]): row for row in csv.DictReader((log_dir / "otprune_report.csv").open())}
    assert rows[("tiny-llava [limit=2]", "OTPrune")]["relative_score"] == ""


def test_dry_run_commands_run_by_hand_give_the_verified_rows(tmp_path):
    """Case 4: the commands a dry run prints, run by hand (how clusters run sweeps), keep their labels."""
    log_dir = tmp_path / "by_hand"
    log_dir.mkdir()
    dry = smoke_run(log_dir, "--methods", "none,OURS", "--limit", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.splitlines() if not line.startswith("==")]
    assert len(lines) == 4  # the tiny checkpoint, two lmms-eval calls, the report
    for line in lines:
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=clean_env(log_dir), cwd=tmp_path)
        assert done.returncode == 0, line + "\n" + done.stdout[-2000:] + done.stderr[-2000:]
    markdown = (log_dir / "otprune_report.md").read_text()
    assert has_row(markdown, "tiny-llava", "Original", "–", "100%")
    assert has_row(markdown, "tiny-llava", "OTPrune", "0", "9.8%")
    assert "? (no records)" not in markdown and "Unverified runs" not in markdown


def test_pruned_run_without_the_entry_point_fails_and_is_never_labelled(tmp_path):
    """Case 1: another package's broken lmms_eval.models entry point makes lmms-eval skip ours: the run is
    FAILED with that cause, and the report keeps it out of the table."""
    broken = tmp_path / "site"
    dist = broken / "zz_broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zz-broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nbroken_model = zz_no_such_module:manifests\n")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    result = smoke_run(log_dir, "--methods", "OURS", "--limit", "2", env=clean_env(log_dir, PYTHONPATH=str(broken)))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    (failed,) = [line for line in result.stderr.splitlines() if line.startswith("otprune run: FAILED:")]
    assert "the otprune entry point did not load" in failed and "broken_model = zz_no_such_module:manifests" in failed
    markdown = (log_dir / "otprune_report.md").read_text()
    assert not has_row(markdown, "tiny-llava", "OTPrune")
    assert "Unverified runs" in markdown and "no spec line" in markdown
