"""End to end through lmms-eval's OWN HF-native wrappers (`llava_hf`, `qwen2_5_vl`), unmodified,
wrapped by our `otprune_hf` plugin (entry point `lmms_eval.models`), on tiny random checkpoints
written by `otprune tiny-hf`: the task `otprune_smoke_gen` with pruning switched on by the
environment, then `otprune report` on the records.

The two lmms-eval processes run side by side (one thread each); ~60 s on 2 CPU cores, mostly
lmms-eval's start-up. Loglikelihood tasks are not run here: lmms-eval's `qwen2_5_vl` has no
loglikelihood, and its `llava_hf` loglikelihood fails on transformers 5 before any model code runs
(its context-length call passes `<image>` text without images to the processor).
"""

import json
import os
import sys
from pathlib import Path

import pytest
from eval_fakes import table_rows
from lmms_cli_runs import assert_ran, side_by_side

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 2

# (family, lmms-eval base model, extra model_args, environment switches, kept ratio)
RUNS = {
    "llava": ("llava_hf", "", {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.25"}, 0.25),
    "qwen2_5_vl": ("qwen2_5_vl", ",min_pixels=3136,max_pixels=28224", {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"}, 0.5),
}


def _records(folder: Path) -> list[dict]:
    lines = []
    for path in sorted(folder.rglob("otprune_records_*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if "otprune_record" in line]  # not the spec / closing lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from otprune.hf import tiny_writer

    base_dir = tmp_path_factory.mktemp("hf_e2e")
    env = {k: v for k, v in os.environ.items() if k not in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_RECORDS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(base_dir / "hf"))
    jobs, outs = {}, {}
    for family, (base, extra, switches, _) in RUNS.items():
        checkpoint = tiny_writer(family)(base_dir / f"tiny-{family}")
        out = base_dir / family
        command = [
            sys.executable, "-m", "lmms_eval", "--model", "otprune_hf",
            "--model_args", f"base={base},pretrained={checkpoint},device_map=cpu{extra}",
            "--device", "cpu", "--tasks", "otprune_smoke_gen", "--include_path", str(ROOT / "lmms_eval" / "tasks"),
            "--batch_size", "1", "--limit", str(LIMIT), "--output_path", str(out), "--gen_kwargs", "max_new_tokens=2",
        ]  # fmt: skip
        jobs[family] = (command, {**env, **switches}, base_dir)
        outs[family] = out
    done = side_by_side(jobs, timeout=900)
    return {family: (outs[family], *done[family]) for family in RUNS}


@pytest.mark.parametrize("family", list(RUNS))
def test_wrapper_runs_pruned_and_logs_the_switches(runs, family):
    out, code, log = runs[family]
    assert_ran(code, log)
    (results,) = out.rglob("*_results.json")
    assert "exact_match,none" in json.loads(results.read_text())["results"]["otprune_smoke_gen"]
    assert "pruning on: " in log  # the adapter says what is active, in lmms-eval's log


@pytest.mark.parametrize("family", list(RUNS))
def test_records_show_k_visual_tokens(runs, family):
    out, _, _ = runs[family]
    _, _, switches, ratio = RUNS[family]
    records = _records(out)
    assert len(records) == LIMIT
    for record in records:
        assert record["method"] == {"OURS": "otprune", "DIVPRUNE": "divprune"}[switches["BASELINE"]]
        assert record["layer"] == 0 and record["ratio"] == ratio
        expected = [max(1, round(ratio * n)) for n in record["image_tokens_before"]]
        assert record["image_tokens_after"] == expected and sum(expected) < record["visual_tokens_before"]
        assert record["seq_len_after"] == record["text_tokens"] + sum(expected)
        assert record["tflops"] < record["tflops_unpruned"]
        assert record["prefill_ms"] > 0 and record["select_ms"] > 0


def test_report_reads_the_hf_records(runs, tmp_path):
    from otprune.cli import main

    for family in RUNS:
        assert runs[family][1] == 0
        assert main(["report", str(runs[family][0]), "--out", str(tmp_path / f"{family}.md")]) == 0
        table = (tmp_path / f"{family}.md").read_text()
        name = {"llava": "OTPrune", "qwen2_5_vl": "DivPrune"}[family]
        assert any(row[1:3] == [name, "0"] for row in table_rows(table))
