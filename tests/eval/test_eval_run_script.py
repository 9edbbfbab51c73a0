import itertools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run_OTPrune.sh"
MODELS = ["liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b", "liuhaotian/llava-v1.6-vicuna-7b"]
TASKS = ["coco2017_cap_val", "flickr30k_test", "gqa", "mmbench_en_dev", "mme", "mmmu_val", "nocaps_val",
         "ok_vqa_val2014", "pope", "scienceqa_img", "seedbench"]
SWITCHES = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "MODELS", "TASKS", "METHODS", "RATIOS", "LAYERS", "LOG_DIR", "LIMIT",
            "NUM_GPUS")


def run(*args, env=None, cwd=None):
    environ = {key: value for key, value in os.environ.items() if key not in SWITCHES}
    environ.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, cwd=cwd)


def commands(stdout):
    """The lmms-eval command lines of a dry run, split like a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if "-m lmms_eval" in line]


def option(argv, name):
    return argv[argv.index(name) + 1]


def test_dry_run_covers_3_models_x_11_tasks(tmp_path):
    result = run("--dry-run", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    pairs = [(option(argv, "--model_args").removeprefix("pretrained="), option(argv, "--tasks")) for argv in lines]
    assert sorted(pairs) == sorted(itertools.product(MODELS, TASKS))
    for line in result.stdout.splitlines():
        if "-m lmms_eval" not in line:
            continue
        # The README's command form, with the pruning switches in front.
        assert line.startswith("BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098 ")
        assert re.search(r"python3? -m accelerate\.commands\.launch --num_processes=\d+ -m lmms_eval --model llava "
                         r"--model_args pretrained=\S+ --tasks \S+ --batch_size 1 --log_samples --output_path \S+", line)
    assert "otprune.cli report" in result.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_settings_by_flags_and_environment(tmp_path):
    result = run("--dry-run", "--tasks", "gqa,pope", "--methods", "none,DIVPRUNE", "--ratios", "0.098,0.25",
                 "--gpus", "4", "--limit", "8", env={"MODELS": "liuhaotian/llava-v1.5-13b", "LOG_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "-m lmms_eval" in line]
    assert len(lines) == 2 * (1 + 2)  # tasks x (unpruned + 2 ratios)
    assert all("--num_processes=4" in line and "--limit 8" in line for line in lines)
    assert all("pretrained=liuhaotian/llava-v1.5-13b" in line for line in lines)
    unpruned = [line for line in lines if line.startswith("env -u BASELINE -u LAYER_INDEX -u SUBSET_RATIO ")]
    assert len(unpruned) == 2
    assert sum("BASELINE=DIVPRUNE LAYER_INDEX=0 SUBSET_RATIO=0.25 " in line for line in lines) == 2
    outputs = {option(shlex.split(line), "--output_path") for line in lines}
    assert len(outputs) == 6  # one folder per run
    assert str(tmp_path / "llava-v1.5-13b" / "divprune_r0.25_l0" / "gqa_limit8") in outputs


def test_paper_group_name_expands_to_the_11_tasks():
    result = run("--dry-run", "--tasks", "otprune_paper", "--models", MODELS[0])
    assert sorted(option(argv, "--tasks") for argv in commands(result.stdout)) == sorted(TASKS)


def test_resume_skips_runs_with_results(tmp_path):
    done = tmp_path / "llava-v1.5-7b" / "ours_r0.098_l0" / "gqa" / "liuhaotian__llava-v1.5-7b"
    done.mkdir(parents=True)
    (done / "20250101_000000_results.json").write_text("{}")
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa,pope", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "skip (results exist)" in result.stdout
    assert [option(argv, "--tasks") for argv in commands(result.stdout)] == ["pope"]
    forced = run("--dry-run", "--force", "--models", MODELS[0], "--tasks", "gqa,pope", "--log-dir", str(tmp_path))
    assert len(commands(forced.stdout)) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "gqa,gqa_typo"], "unknown task 'gqa_typo'"),
        (["--models", "someone/llava-foo"], "unknown model 'someone/llava-foo'"),
        (["--ratio", "1.5"], "SUBSET_RATIO='1.5'"),
        (["--layer", "x"], "LAYER_INDEX='x'"),
        (["--method", "NOPE"], "BASELINE='NOPE': unknown method"),
        (["--gpus", "0"], "--gpus"),
        (["--limit", "-3"], "--limit"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_bad_names_and_values_are_clear_errors(args, message):
    result = run("--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "-m lmms_eval" not in result.stdout


def test_allow_unknown_and_local_checkpoint_folders(tmp_path):
    local = tmp_path / "my-llava"
    local.mkdir()
    result = run("--dry-run", "--models", str(local), "--tasks", "gqa")
    assert result.returncode == 0, result.stderr
    assert f"pretrained={local}" in result.stdout
    result = run("--dry-run", "--models", "someone/llava-foo", "--tasks", "textvqa_val", "--allow-unknown")
    assert result.returncode == 0, result.stderr
    assert "--tasks textvqa_val" in result.stdout


def test_smoke_dry_run(tmp_path):
    result = run("--smoke", "--dry-run", "--log-dir", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert "otprune.cli tiny-llava" in result.stdout
    lines = commands(result.stdout)
    assert len(lines) == 2
    for argv in lines:
        assert option(argv, "--tasks") == "otprune_smoke"
        assert option(argv, "--model_args").endswith(",device=cpu,device_map=auto")
        assert option(argv, "--include_path") == str(ROOT / "lmms_eval" / "tasks")
    assert "BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098" in result.stdout
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_without_gpu_it_points_to_the_smoke_test(tmp_path):
    result = run("--log-dir", str(tmp_path), "--tasks", "gqa", "--models", MODELS[0])
    assert result.returncode == 2
    assert "no GPU found" in result.stderr and "bash run_OTPrune.sh --smoke" in result.stderr
    assert not any(tmp_path.iterdir())


def test_help():
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--models", "--tasks", "--methods", "--ratios", "--layers", "--gpus", "--log-dir", "--limit", "--dry-run", "--smoke"):
        assert flag in result.stdout
