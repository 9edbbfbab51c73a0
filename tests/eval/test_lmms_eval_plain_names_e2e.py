"""lmms-eval's OWN model names `llava_hf` and `qwen2_5_vl` (chat, and simple with --force_simple) prune
with the switches once our package is installed (our entry point registers over them), end to end
through lmms-eval's CLI on tiny checkpoints (`otprune tiny-hf`), task `otprune_smoke_gen`:

- with the switches: pruned, records beside lmms-eval's results (method, K tokens per image);
- without: the same outputs as lmms-eval's own, unwrapped class, and no records file;
- without switches but OTPRUNE_RECORDS=auto: still the unwrapped outputs, unpruned records.

Per family one process runs all its command lines (`lmms_cli_runs.py`: lmms-eval's import is paid
once); the two families run side by side. ~2 min on 2 CPU cores.
"""

import json
import sys
from pathlib import Path

import pytest
from lmms_cli_runs import assert_ran, child_env, side_by_side

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LIMIT = 2
TASK = "otprune_smoke_gen"

# family -> (lmms-eval model name, extra model_args, switches, kept ratio, method, lmms-eval's own classes)
FAMILIES = {
    "llava": ("llava_hf", "", {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.25"}, 0.25, "otprune",
              ("lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf")),
    "qwen2_5_vl": ("qwen2_5_vl", ",min_pixels=3136,max_pixels=28224", {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"}, 0.5,
                   "divprune",
                   ("lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL")),
}
VARIANTS = ("chat", "simple")
# run name -> (model name: our registration or the reference, switches?, extra environment)
RUNS = {
    "pruned": ("plain", True, {}),
    "plain": ("plain", False, {}),
    "reference": ("reference", False, {}),
}
ASKED = ("chat", "records_asked")  # one more run: no switch, OTPRUNE_RECORDS=auto


def _records(folder: Path) -> list[Path]:
    return sorted(folder.rglob("otprune_records_*.jsonl"))


def _lines(paths: list[Path]) -> list[dict]:
    """The per-sample records of the files (the run's spec and end lines aside)."""
    lines = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("otprune_record")]


def _samples(folder: Path) -> dict[int, dict]:
    (path,) = folder.rglob(f"*_samples_{TASK}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["doc_id"]: {key: row[key] for key in ("input", "filtered_resps", "exact_match")} for row in rows}


def _results(folder: Path) -> dict:
    (path,) = folder.rglob("*_results.json")
    return json.loads(path.read_text())["results"][TASK]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from otprune.hf import tiny_writer

    base_dir = tmp_path_factory.mktemp("plain_names")
    env = child_env(base_dir, ROOT)
    jobs, folders_of = {}, {}
    for family, (name, extra, switches, _, _, own) in FAMILIES.items():
        checkpoint = tiny_writer(family)(base_dir / f"tiny-{family}")
        plan, folders = [], {}
        for variant in VARIANTS:
            for run, (which, switched, more) in [*RUNS.items(), *([(ASKED[1], ("plain", False, {"OTPRUNE_RECORDS": "auto"}))]
                                                                  if variant == ASKED[0] else [])]:
                out = base_dir / family / variant / run
                model = name if which == "plain" else f"reference_{name}"
                argv = ["--model", model, "--model_args", f"pretrained={checkpoint},device_map=cpu{extra}",
                        "--device", "cpu", "--tasks", TASK, "--include_path", str(ROOT / "lmms_eval" / "tasks"),
                        "--batch_size", "1", "--limit", str(LIMIT), "--output_path", str(out), "--log_samples",
                        "--gen_kwargs", "max_new_tokens=2", *(["--force_simple"] if variant == "simple" else [])]
                plan.append({"env": {**(switches if switched else {}), **more}, "argv": argv})
                folders[(variant, run)] = out
        spec = base_dir / f"{family}.json"
        spec.write_text(json.dumps({"references": {f"reference_{name}": list(own)}, "runs": plan}))
        jobs[family] = ([sys.executable, str(HERE / "lmms_cli_runs.py"), str(spec)], env, base_dir)
        folders_of[family] = folders
    done = side_by_side(jobs, timeout=1200)
    return {family: (folders_of[family], *done[family]) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_run_has_results(runs, family):
    folders, code, log = runs[family]
    assert_ran(code, log)
    for folder in folders.values():
        assert "exact_match,none" in _results(folder), folder


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_switches_prune_the_plain_name(runs, family, variant):
    folders, _, _ = runs[family]
    _, _, switches, ratio, method, _ = FAMILIES[family]
    folder = folders[(variant, "pruned")]
    paths = _records(folder)
    (results,) = folder.rglob("*_results.json")
    assert paths and all(path.parent == results.parent for path in paths)  # beside lmms-eval's results
    lines = _lines(paths)
    assert len(lines) == LIMIT
    for record in lines:
        assert record["method"] == method and record["layer"] == 0 and record["ratio"] == ratio
        expected = [max(1, round(ratio * n)) for n in record["image_tokens_before"]]
        assert record["image_tokens_after"] == expected and sum(expected) < record["visual_tokens_before"]
        assert record["seq_len_after"] == record["text_tokens"] + sum(expected)
        assert record["tflops"] < record["tflops_unpruned"]
        assert record["model_args"].startswith("pretrained=") and record["tasks"] == TASK


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_without_switches_the_plain_name_is_lmms_evals_own(runs, family, variant):
    folders, _, _ = runs[family]
    plain, reference = folders[(variant, "plain")], folders[(variant, "reference")]
    assert _records(plain) == []
    assert _records(reference) == []
    assert _samples(plain) == _samples(reference)
    assert len(_samples(plain)) == LIMIT
    assert _results(plain)["exact_match,none"] == _results(reference)["exact_match,none"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_records_when_asked_without_switches(runs, family):
    folders, _, _ = runs[family]
    variant, run = ASKED
    folder = folders[(variant, run)]
    assert _samples(folder) == _samples(folders[(variant, "reference")])  # unpruned
    lines = _lines(_records(folder))
    assert len(lines) == LIMIT
    for record in lines:
        assert record["method"] is None
        assert record["visual_tokens_after"] == record["visual_tokens_before"]
        assert record["tflops"] == record["tflops_unpruned"]
