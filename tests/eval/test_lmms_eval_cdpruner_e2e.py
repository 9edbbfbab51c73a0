"""lmms-eval's own `llava_hf` (chat) with BASELINE=CDPRUNER, end to end through its CLI on a tiny
checkpoint and a tiny CLIP checkpoint named by CDPRUNER_CLIP (task `otprune_smoke_gen`): every
sample pruned by CDPruner (records: method, K of T tokens per image); without CDPRUNER_CLIP the run
stops before any sample, naming the switch. One process for both runs (~40 s on 2 CPU cores)."""

import json
import sys
from pathlib import Path

import pytest
from lmms_cli_runs import assert_ran, child_env, side_by_side

pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TASK = "otprune_smoke_gen"
LIMIT = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    from otprune.hf import tiny_writer
    from otprune.hf.tiny import write_tiny_clip

    base = tmp_path_factory.mktemp("cdpruner_e2e")
    checkpoint = tiny_writer("llava")(base / "tiny-llava")
    clip = write_tiny_clip(base / "tiny-clip", LlavaForConditionalGeneration.from_pretrained(checkpoint).model.vision_tower)
    argv = ["--model", "llava_hf", "--model_args", f"pretrained={checkpoint},device_map=cpu", "--device", "cpu",
            "--tasks", TASK, "--include_path", str(ROOT / "lmms_eval" / "tasks"), "--batch_size", "1",
            "--limit", str(LIMIT), "--gen_kwargs", "max_new_tokens=2"]
    switches = {"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.25"}
    plan = [{"env": {**switches, "CDPRUNER_CLIP": str(clip)}, "argv": [*argv, "--output_path", str(base / "pruned")]},
            {"env": switches, "argv": [*argv, "--output_path", str(base / "no_clip")]}]
    spec = base / "spec.json"
    spec.write_text(json.dumps({"runs": plan}))
    env = child_env(base, ROOT)
    env.pop("CDPRUNER_CLIP", None)
    done = side_by_side({"runs": ([sys.executable, str(HERE / "lmms_cli_runs.py"), str(spec)], env, base)}, timeout=900)
    return base, *done["runs"]


def test_llava_hf_runs_cdpruner_on_every_sample(runs):
    base, code, log = runs
    assert_ran(code, log.split("=== run 1")[0])
    lines = [json.loads(line) for path in (base / "pruned").rglob("otprune_records_*.jsonl")
             for line in path.read_text().splitlines() if line.strip()]
    samples = [line for line in lines if line.get("otprune_record")]
    assert len(samples) == LIMIT
    for sample in samples:
        assert sample["method"] == "cdpruner" and sample["ratio"] == 0.25
        assert sample["image_tokens_after"] == [round(0.25 * t) for t in sample["image_tokens_before"]]


def test_without_cdpruner_clip_the_run_stops_before_any_sample(runs):
    base, _, log = runs
    no_clip = log.split("=== run 1")[1]
    assert "CDPRUNER_CLIP: unset" in no_clip
    assert not list((base / "no_clip").rglob("*_samples_*.jsonl")) and not list((base / "no_clip").rglob("otprune_records_*"))
