"""`run_OTPrune.sh --study fig2|fig3|fig5` (issue #16 point 3): the planned runs (dry run), and
`--smoke --study X` end to end on the tiny checkpoint with every artefact in the report folder.

The end-to-end test runs 6 + 9 + 4 lmms-eval processes on CPU (2 documents each): a few minutes."""

from __future__ import annotations

import csv
import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from otprune.eval.studies import STUDIES, get_study, main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run_OTPrune.sh"
CLEAN = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "MODELS", "TASKS", "METHODS", "RATIOS", "LAYERS", "LOG_DIR", "LIMIT",
         "NUM_GPUS", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER", "OTPRUNE_RECORDS", "OTPRUNE_DISTANCE", "STUDY",
         "GAMMAS")
ELEVEN = 11


def run(*args, cwd=None):
    env = {key: value for key, value in os.environ.items() if key not in CLEAN}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd)


def planned(stdout: str) -> list[tuple[str, str, str, str]]:
    """(model, task, setting folder, gamma) of every lmms-eval command of a dry run."""
    out = []
    for line in stdout.splitlines():
        if "-m lmms_eval" not in line:
            continue
        argv = shlex.split(line)
        path = Path(argv[argv.index("--output_path") + 1])  # LOG_DIR/<model>/<setting>/<task>-<spec hash>/run_<id>
        if path.name.startswith("run_"):
            path = path.parent
        path = path.with_name(path.name.rsplit("-", 1)[0])  # the task
        gamma = next((a.split("=", 1)[1] for a in argv if a.startswith("OTPRUNE_GAMMA=")), "")
        out.append((argv[argv.index("--model_args") + 1].removeprefix("pretrained="), path.name, path.parent.name, gamma))
    return out


def test_study_plans_name_the_papers_runs(tmp_path):
    fig2 = planned(run("--study", "fig2", "--dry-run", "--log-dir", str(tmp_path)).stdout)
    assert {m for m, *_ in fig2} == {"liuhaotian/llava-v1.5-7b"} and len(fig2) == ELEVEN * 6
    assert {s for _, _, s, _ in fig2} == {"original", "first_k_r0.098_l0", "last_k_r0.098_l0", "uniform_r0.098_l0",
                                          "random_r0.098_l0", "divprune_r0.098_l0"}
    fig3 = planned(run("--study", "fig3", "--dry-run").stdout)
    assert {m for m, *_ in fig3} == {"liuhaotian/llava-v1.5-13b"} and len(fig3) == ELEVEN * (1 + 4 * 6)
    assert {s for _, _, s, _ in fig3 if s.startswith("dpp")} == {f"dpp_r{r}_l0" for r in ("0.05", "0.098", "0.2", "0.3", "0.4", "0.5")}
    fig5 = planned(run("--study", "fig5", "--dry-run").stdout)
    assert len({m for m, *_ in fig5}) == 3 and len(fig5) == 3 * ELEVEN * (1 + 5)
    assert {g for *_, g in fig5} == {"", "0.005", "0.01", "0.02", "0.05", "0.1"}  # "": the unpruned runs
    assert "otprune_r0.098_l0_g0.005" in {s for _, _, s, _ in fig5}
    # --models / --tasks still choose; a bad study name or a gamma without OTPrune is a clear error
    few = planned(run("--study", "fig2", "--dry-run", "--models", "liuhaotian/llava-v1.5-13b", "--tasks", "gqa").stdout)
    assert {(m, t) for m, t, *_ in few} == {("liuhaotian/llava-v1.5-13b", "gqa")} and len(few) == 6
    bad = run("--study", "fig9", "--dry-run")
    assert bad.returncode == 2 and "--study 'fig9': unknown study; known: fig2, fig3, fig5, sota" in bad.stderr
    bad = run("--gammas", "0.1", "--methods", "DIVPRUNE", "--dry-run")
    assert bad.returncode == 2 and "only OTPrune (OURS) takes gamma" in bad.stderr


def test_smoke_study_plans(tmp_path):
    result = run("--smoke", "--study", "fig5", "--dry-run", "--log-dir", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    runs = planned(result.stdout)
    assert {t for _, t, _, _ in runs} == {"otprune_smoke"}
    assert [s for _, _, s, _ in runs] == ["original", "otprune_r0.25_l0_g0.005", "otprune_r0.25_l0", "otprune_r0.25_l0_g0.1"]


def test_study_module_prints_shell_assignments(capsys):
    assert main(["fig3", "--smoke"]) == 0
    assert "METHODS=none,OURS,DIVPRUNE,DPP,RANDOM" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert set(STUDIES) == {"fig2", "fig3", "fig5", "sota"} and get_study(" FIG2 ").name == "fig2"


ARTEFACTS = {
    "fig2": ["fig2.md", "fig2.csv", "fig2.png", "fig3.md", "fig34.png"],
    "fig3": ["fig3.md", "fig3.csv", "fig4.md", "fig4.csv", "fig34.png", "wilcoxon.md", "wilcoxon.csv"],
    "fig5": ["fig5.md", "fig5.csv", "fig5.png"],
}


@pytest.mark.skipif(importlib.util.find_spec("llava") is None, reason="the llava package is not available")
@pytest.mark.parametrize("study", ["fig2", "fig3", "fig5"])
def test_smoke_study_end_to_end_writes_every_artefact(tmp_path, study):
    log_dir = tmp_path / study
    # fig3: every document of otprune_smoke, so that DivPrune's scores are not all 0 on the tiny model (a 0
    # baseline has no relative improvement: no Wilcoxon test); the others: 2 documents per task
    limit = [] if study == "fig3" else ["--limit", "2"]
    env_result = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--study", study, "--log-dir", str(log_dir), *limit,
         "--", "--gen_kwargs", "max_new_tokens=2"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k not in CLEAN}, "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    assert env_result.returncode == 0, env_result.stdout[-3000:] + env_result.stderr[-3000:]
    for name in ARTEFACTS[study]:
        path = log_dir / f"otprune_report_{name}"
        assert path.exists() and path.stat().st_size > 0, name
    if study == "fig2":
        rows = list(csv.reader((log_dir / "otprune_report_fig2.csv").open()))
        assert rows[0][:4] == ["model", "kept ratio", "layer", "task"] and any(r[3] == "pooled" for r in rows)
