"""The lmms-eval task configs shipped in lmms_eval/tasks: data, helpers, names, and a real
lmms-eval run of otprune_smoke with lmms-eval's `dummy` model (no llava needed, no network)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from otprune.eval import report

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "lmms_eval" / "tasks"
SMOKE = TASKS / "otprune_smoke"


def load_yaml(path):
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(path.read_text(), Loader=Loader)


def smoke_utils():
    spec = importlib.util.spec_from_file_location("smoke_utils", SMOKE / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_python_package_shadows_lmms_eval():
    assert not (ROOT / "lmms_eval" / "__init__.py").exists()
    assert not (TASKS / "__init__.py").exists()


def test_paper_group_lists_the_11_tasks_and_lmms_eval_has_them():
    group = load_yaml(TASKS / "otprune_paper" / "otprune_paper.yaml")
    assert group["group"] == "otprune_paper"
    assert group["task"] == list(report.PAPER_TASKS)
    import lmms_eval

    installed = set()
    for path in Path(lmms_eval.__file__).parent.joinpath("tasks").rglob("*.yaml"):
        try:
            config = load_yaml(path)
        except yaml.YAMLError:
            continue
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            installed.add(config["task"])
    assert set(group["task"]) <= installed


def test_smoke_data_is_local_and_complete():
    lines = [json.loads(line) for line in (SMOKE / "smoke.jsonl").read_text().splitlines()]
    assert 8 <= len(lines) <= 12
    assert {line["asked"] for line in lines} == {"colour", "count", "shape"}
    for line in lines:
        image = Image.open(SMOKE / line["image"])
        assert image.size == (96, 96)
        assert line["choices"][line["label"]] == line["answer"]
    for name in ("otprune_smoke_gen", "otprune_smoke_mc"):
        config = load_yaml(SMOKE / f"{name}.yaml")
        assert config["task"] == name
        assert config["dataset_path"] == "json" and config["dataset_kwargs"]["data_files"]["test"] == "smoke.jsonl"
    assert load_yaml(SMOKE / "otprune_smoke_gen.yaml")["output_type"] == "generate_until"
    assert load_yaml(SMOKE / "otprune_smoke_mc.yaml")["output_type"] == "multiple_choice"
    assert load_yaml(SMOKE / "otprune_smoke.yaml")["task"] == ["otprune_smoke_gen", "otprune_smoke_mc"]


def test_generator_reproduces_the_shipped_data(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smoke_task.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    assert (tmp_path / "smoke.jsonl").read_text() == (SMOKE / "smoke.jsonl").read_text()
    for line in (SMOKE / "smoke.jsonl").read_text().splitlines():
        name = json.loads(line)["image"]
        assert Image.open(tmp_path / name).tobytes() == Image.open(SMOKE / name).tobytes()


def test_helpers():
    utils = smoke_utils()
    doc = json.loads((SMOKE / "smoke.jsonl").read_text().splitlines()[3])  # 3 yellow circles, count
    (image,) = utils.smoke_doc_to_visual(doc)
    assert image.mode == "RGB" and image.getpixel((24, 24)) == (240, 200, 20)
    assert utils.smoke_doc_to_text(doc) == "How many circles are there?\nAnswer the question using a single word or phrase."
    assert utils.smoke_doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": ""}) == "Q: How many circles are there?"
    assert utils.smoke_doc_to_choice(doc) == ["1", "2", "3", "4"]
    # llava's loglikelihood gives the option's mean NLL: the smallest wins. lmms-eval 0.7.3 passes strings.
    assert utils.smoke_mc_process_results(doc, ["(2.0, False)", "(1.5, False)", "(0.25, True)", "(3.0, False)"]) == {"acc": 1.0}
    assert utils.smoke_mc_process_results(doc, [(0.1, False), (1.5, False), (0.25, True), (3.0, False)]) == {"acc": 0.0}
    with pytest.raises(ValueError, match="3 results for 4 options"):
        utils.smoke_mc_process_results(doc, [(0.1, False)] * 3)


@pytest.mark.skipif(
    importlib.util.find_spec("llava") is not None and importlib.util.find_spec("llava.model.builder") is not None,
    reason="covered, with the real llava model, by test_lmms_eval_e2e.py (saves ~25 s)",
)
def test_lmms_eval_runs_the_smoke_group_offline_and_report_reads_it(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               OTPRUNE_RECORDS="off")
    out = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "dummy", "--include_path", str(TASKS), "--tasks", "otprune_smoke",
         "--batch_size", "1", "--log_samples", "--output_path", str(out), "--limit", "4", "--verbosity", "WARNING"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    data = json.loads(results_file.read_text())
    assert set(data["group_subtasks"]["otprune_smoke"]) == {"otprune_smoke_gen", "otprune_smoke_mc"}
    assert data["results"]["otprune_smoke_gen"]["exact_match,none"] == 0.0  # the dummy answers "A"
    # The dummy's losses all tie, so the first option is picked: right for docs 0 (label 0) only.
    assert data["results"]["otprune_smoke_mc"]["acc,none"] == pytest.approx(0.25)
    assert {path.name.split("_samples_")[1] for path in out.rglob("*_samples_*.jsonl")} == {
        "otprune_smoke_gen.jsonl", "otprune_smoke_mc.jsonl"}
    rep = report.build_report(out)
    (row,) = rep.rows
    assert row.scores == pytest.approx({"otprune_smoke_gen": 0.0, "otprune_smoke_mc": 25.0})
