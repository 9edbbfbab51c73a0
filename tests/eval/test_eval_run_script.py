import itertools
import json
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
            "NUM_GPUS", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER", "FITPRUNE_RECIPE", "FASTV_LAYERS", "VTW_LAYERS",
            "PYTHON", "OTPRUNE_RECORDS")


def run(*args, env=None, cwd=None):
    environ = {key: value for key, value in os.environ.items() if key not in SWITCHES}
    environ.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, cwd=cwd)


def commands(stdout):
    """The lmms-eval command lines of a dry run, split like a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if "-m lmms_eval" in line]


def option(argv, name):
    return argv[argv.index(name) + 1]


def hub_folder(model):
    """The run folder of a hub id, by the documented rule: owner--name-<8 hex of sha256('hub:owner/name')>."""
    import hashlib

    return model.replace("/", "--") + "-" + hashlib.sha256(f"hub:{model}".encode()).hexdigest()[:8]


def task_dir(output_path):
    """The task folder of a call's --output_path (LOG_DIR/<model>/<setting>/<task>/run_<id>)."""
    path = Path(output_path)
    assert re.fullmatch(r"run_\d{8}_\d{6}_[0-9a-f]{8}", path.name), path
    return path.parent


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
    assert str(tmp_path / hub_folder("liuhaotian/llava-v1.5-13b") / "divprune_r0.25_l0" / "gqa_limit8") in {
        str(task_dir(out)) for out in outputs}


def test_paper_group_name_expands_to_the_11_tasks():
    result = run("--dry-run", "--tasks", "otprune_paper", "--models", MODELS[0])
    assert sorted(option(argv, "--tasks") for argv in commands(result.stdout)) == sorted(TASKS)


def write_lmms_results(output_path, model, task, results=None):
    """lmms-eval 0.7's results file of one run (only the keys the script reads)."""
    from otprune.eval.records import sanitize_model_name

    folder = Path(output_path) / sanitize_model_name(model)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"results": {task: {"alias": task, "exact_match,none": 0.5}} if results is None else results}
    (folder / "20250101_000000_results.json").write_text(json.dumps(data))


def test_resume_skips_runs_with_results(tmp_path):
    write_lmms_results(tmp_path / hub_folder(MODELS[0]) / "ours_r0.098_l0" / "gqa" / "run_x", MODELS[0], "gqa")
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa,pope", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "skip (results exist)" in result.stdout
    assert [option(argv, "--tasks") for argv in commands(result.stdout)] == ["pope"]
    forced = run("--dry-run", "--force", "--models", MODELS[0], "--tasks", "gqa,pope", "--log-dir", str(tmp_path))
    assert len(commands(forced.stdout)) == 2


@pytest.mark.parametrize("results", [None, {}, {"results": {}}, {"results": {"pope": {"acc,none": 1.0}}},
                                     {"results": {"gqa": {"alias": "gqa"}}}, "not json"])
def test_resume_retries_runs_without_complete_results(tmp_path, results):
    """A results file without numbers for the task (or none at all) is a failed run: run it again."""
    out = tmp_path / hub_folder(MODELS[0]) / "ours_r0.098_l0" / "gqa"
    folder = out / "run_x" / "liuhaotian__llava-v1.5-7b"
    folder.mkdir(parents=True)
    (folder / "otprune_records_x.jsonl").write_text("{}\n")
    if results is not None:
        text = results if isinstance(results, str) else json.dumps(results)
        (folder / "20250101_000000_results.json").write_text(text)
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "skip" not in result.stdout and "retry (no complete results" in result.stdout
    assert [option(argv, "--tasks") for argv in commands(result.stdout)] == ["gqa"]


# ---------------------------------------------------------------- real runs with a fake lmms-eval

FAKE_LMMS = """
import json, os, sys, time
from otprune.eval.records import model_name_from_args, sanitize_model_name

args = sys.argv[1:]
def value(name):
    return args[args.index(name) + 1]
out, task, model_args = value("--output_path"), value("--tasks"), value("--model_args")
env = {k: os.environ.get(k) for k in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED",
                                       "OTPRUNE_ORDER", "FITPRUNE_RECIPE", "OTPRUNE_RUN_ID")}
with open(os.environ["FAKE_LMMS_LOG"], "a") as log:
    log.write(json.dumps({"task": task, "output_path": out, "argv": args, "env": env}) + "\\n")
behaviour = dict(item.split("=") for item in os.environ.get("FAKE_LMMS", "").split(",") if item).get(task, "ok")
print("fake lmms-eval", task, behaviour)
if behaviour == "fail":
    sys.exit(3)
if behaviour == "silent":  # lmms-eval logs the model's exception and exits 0 without results
    print("Error during evaluation: The size of tensor a (4) must match the size of tensor b (5)", file=sys.stderr)
    sys.exit(0)
folder = os.path.join(out, sanitize_model_name(model_name_from_args(model_args)))
os.makedirs(folder, exist_ok=True)
results = {task: {"alias": task, "exact_match,none": 0.25}} if behaviour == "ok" else {}
with open(os.path.join(folder, time.strftime("%Y%m%d_%H%M%S") + "_results.json"), "w") as file:
    json.dump({"results": results, "config": {"model_args": model_args}}, file)
"""


@pytest.fixture
def fake_gpu_env(tmp_path):
    """PATH with a fake nvidia-smi, PYTHON = a wrapper that runs FAKE_LMMS for `-m accelerate.commands.launch`."""
    import sys

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    (bin_dir / "fake_lmms.py").write_text(FAKE_LMMS)
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "${1:-}" == -m && "${2:-}" == accelerate.commands.launch ]]; then\n'
        f'    exec {shlex.quote(sys.executable)} {shlex.quote(str(bin_dir / "fake_lmms.py"))} "$@"\n'
        "fi\n"
        'if [[ "${1:-}" == -c && "${2:-}" == *torch.cuda* ]]; then exit 0; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    for name in ("nvidia-smi", "python"):
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "lmms_calls.jsonl"
    log.touch()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"), "FAKE_LMMS_LOG": str(log)}
    return env, log


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_runs_without_results_fail_the_script_and_are_retried(tmp_path, fake_gpu_env):
    env, log = fake_gpu_env
    logs = tmp_path / "logs"
    args = ("--models", MODELS[0], "--tasks", "gqa,pope,mme,seedbench", "--methods", "VTW", "--vtw-layers", "2",
            "--log-dir", str(logs), "--no-report")
    first = run(*args, env={**env, "FAKE_LMMS": "pope=silent,mme=fail,seedbench=empty"})
    assert first.returncode == 1, first.stdout + first.stderr
    assert [call["task"] for call in calls(log)] == ["gqa", "pope", "mme", "seedbench"]
    summary = [line for line in first.stderr.splitlines() if line.startswith("run_OTPrune.sh: FAILED:")]
    assert len(summary) == 3
    base = logs / hub_folder(MODELS[0]) / "vtw_l2"
    runs = {call["task"]: Path(call["output_path"]) for call in calls(log)}
    whys = ("lmms-eval exited 0 without results for pope", "lmms-eval exited 3", "lmms-eval exited 0 without results for seedbench")
    for line, task, why in zip(summary, ("pope", "mme", "seedbench"), whys, strict=True):
        assert str(runs[task]) in line and why in line and str(runs[task] / "lmms_eval.log") in line
        assert task_dir(runs[task]) == base / task
    assert "3 of 4 runs failed" in first.stderr
    assert not any(str(base / "gqa") in line for line in summary)
    info = json.loads((runs["gqa"] / "otprune_run.json").read_text())
    assert (info["method"], info["layer"], info["ratio"], info["lmms_model"]) == ("vtw", 2, None, "llava")
    assert info["run_id"] == calls(log)[0]["env"]["OTPRUNE_RUN_ID"] == runs["gqa"].name.removeprefix("run_")
    assert len({call["env"]["OTPRUNE_RUN_ID"] for call in calls(log)}) == 4  # one id per call
    assert calls(log)[0]["env"]["BASELINE"] == "VTW" and calls(log)[0]["env"]["SUBSET_RATIO"] is None

    log.write_text("")
    second = run(*args, env=env)  # resume: only the failed runs run again
    assert second.returncode == 0, second.stdout + second.stderr
    assert [call["task"] for call in calls(log)] == ["pope", "mme", "seedbench"]
    assert "skip (results exist)" in second.stdout and "FAILED" not in second.stderr


def test_gamma_sweep_runs_are_not_skipped(tmp_path, fake_gpu_env):
    env, log = fake_gpu_env
    logs = tmp_path / "logs"
    args = ("--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(logs), "--no-report")
    assert run(*args, env={**env, "OTPRUNE_GAMMA": "0.01"}).returncode == 0
    second = run(*args, env={**env, "OTPRUNE_GAMMA": "0.05"})
    assert second.returncode == 0, second.stderr
    assert "skip" not in second.stdout
    assert [(call["env"]["OTPRUNE_GAMMA"], task_dir(call["output_path"]).parent.name) for call in calls(log)] == [
        ("0.01", "ours_r0.098_l0"), ("0.05", "ours_r0.098_l0_g0.05")]
    (path,) = (logs / hub_folder(MODELS[0]) / "ours_r0.098_l0_g0.05" / "gqa").glob("run_*/otprune_run.json")
    info = json.loads(path.read_text())
    assert (info["method"], info["gamma"], info["seed"], info["order"], info["recipe"]) == ("otprune", 0.05, None,
                                                                                           "ascending", None)


# ---------------------------------------------------------------- methods and their layers


def settings_of(stdout):
    """{setting folder: the pruning variables in front of its command} of a dry run."""
    found = {}
    for argv in commands(stdout):
        out = task_dir(option(argv, "--output_path"))
        found[out.parent.name] = [arg for arg in argv[: argv.index("-m") - 1]
                                  if "=" in arg and arg.split("=")[0].isupper() and not arg.startswith("OTPRUNE_RUN_ID=")]
    return found


def test_every_method_with_its_default_layer_in_one_call(tmp_path):
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "none,OURS,FASTV,VTW",
                 "--vtw-layers", "16", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert settings_of(result.stdout) == {
        "original": [],
        "ours_r0.098_l0": ["BASELINE=OURS", "LAYER_INDEX=0", "SUBSET_RATIO=0.098"],
        "fastv_r0.098_l2": ["BASELINE=FASTV", "LAYER_INDEX=2", "SUBSET_RATIO=0.098"],
        "vtw_l16": ["BASELINE=VTW", "LAYER_INDEX=16"],
    }


def test_layers_apply_to_the_methods_that_can_use_them(tmp_path):
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,FASTV,VTW",
                 "--layers", "0,3", "--ratios", "0.25,0.5", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(settings_of(result.stdout)) == sorted([
        "ours_r0.25_l0", "ours_r0.25_l3", "ours_r0.5_l0", "ours_r0.5_l3",
        "fastv_r0.25_l3", "fastv_r0.5_l3",  # FastV and VTW act at layers >= 1: the given ones
        "vtw_l3",  # VTW keeps no visual token: no ratio, one run
    ])
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "FASTV", "--fastv-layers", "1,2",
                 "--layers", "3", "--log-dir", str(tmp_path))
    assert sorted(settings_of(result.stdout)) == ["fastv_r0.098_l1", "fastv_r0.098_l2"]


def test_vtw_without_a_layer_is_a_clear_error(tmp_path):
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,VTW", "--log-dir", str(tmp_path))
    assert result.returncode == 2
    assert "VTW" in result.stderr and "--vtw-layers" in result.stderr
    assert "-m lmms_eval" not in result.stdout


def test_fitprune_takes_its_recipe(tmp_path):
    from otprune.methods.fitprune import FitPruneRecipe, save_recipe

    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "FITPRUNE", "--log-dir", str(tmp_path))
    assert result.returncode == 2 and "FITPRUNE_RECIPE" in result.stderr
    recipe = save_recipe(FitPruneRecipe(32, 4096, 11008, 576, 60, (0,) * 2 + (100,) * 30, 0.5), tmp_path / "r7b.json")
    for how in (("--fitprune-recipe", str(recipe)), ()):
        extra = {} if how else {"FITPRUNE_RECIPE": str(recipe)}
        result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,FITPRUNE", *how,
                     "--layers", "0", "--ratios", "0.098,0.25", "--log-dir", str(tmp_path / "logs"), env=extra)
        assert result.returncode == 0, result.stderr
        found = settings_of(result.stdout)
        (tag,) = [name for name in found if name.startswith("fitprune")]
        assert tag.startswith("fitprune_r7b-") and found[tag] == ["BASELINE=FITPRUNE", f"FITPRUNE_RECIPE={recipe}"]
        assert len(found) == 3  # OURS x 2 ratios + one FitPrune run (its counts come from the recipe)


def test_settings_from_the_environment_name_the_run(tmp_path):
    env = {"OTPRUNE_GAMMA": "0.05", "OTPRUNE_SEED": "3", "OTPRUNE_ORDER": "official"}
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,RANDOM,DIVPRUNE,FASTV",
                 "--layers", "0", "--log-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert settings_of(result.stdout) == {
        "ours_r0.098_l0_g0.05_official": ["BASELINE=OURS", "LAYER_INDEX=0", "SUBSET_RATIO=0.098", "OTPRUNE_GAMMA=0.05",
                                          "OTPRUNE_ORDER=official"],
        "random_r0.098_l0_s3_official": ["BASELINE=RANDOM", "LAYER_INDEX=0", "SUBSET_RATIO=0.098", "OTPRUNE_SEED=3",
                                         "OTPRUNE_ORDER=official"],
        "divprune_r0.098_l0_official": ["BASELINE=DIVPRUNE", "LAYER_INDEX=0", "SUBSET_RATIO=0.098", "OTPRUNE_ORDER=official"],
        "fastv_r0.098_l2": ["BASELINE=FASTV", "LAYER_INDEX=2", "SUBSET_RATIO=0.098"],  # the order is for layer 0 only
    }
    bad = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", env={"OTPRUNE_GAMMA": "-1"})
    assert bad.returncode == 2 and "OTPRUNE_GAMMA='-1'" in bad.stderr


def test_refused_checkpoint_is_not_a_known_model():
    result = run("--dry-run", "--models", "liuhaotian/llava-v1.6-mistral-7b", "--tasks", "gqa")
    assert result.returncode == 2
    assert "Mistral" in result.stderr
    assert "liuhaotian/llava-v1.6-mistral-7b" not in run("--help").stdout


# ---------------------------------------------------------------- which lmms-eval model runs a checkpoint


def lmms_models(stdout):
    return {option(argv, "--model_args"): option(argv, "--model") for argv in commands(stdout)}


def test_hf_checkpoints_run_through_lmms_evals_own_names(tmp_path):
    models = ["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "liuhaotian/llava-v1.5-7b",
              "llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf"]
    result = run("--dry-run", "--models", ",".join(models), "--tasks", "gqa", "--methods", "none,OURS",
                 "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert lmms_models(result.stdout) == {
        "pretrained=llava-hf/llava-1.5-7b-hf": "llava_hf",
        "pretrained=Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
        "pretrained=liuhaotian/llava-v1.5-7b": "llava",
        "pretrained=llava-hf/llava-v1.6-mistral-7b-hf": "llava_hf",
        "pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava_hf",
    }
    assert len(commands(result.stdout)) == 10
    assert "--model qwen2_5_vl --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct --tasks gqa" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "-m lmms_eval" in line]
    # unpruned runs of the HF names ask for records (the report's FLOPs); the llava package always writes them
    unpruned = [line for line in lines if "BASELINE=" not in line]
    assert len(unpruned) == 5
    for line in unpruned:
        assert line.startswith("OTPRUNE_RECORDS=auto ") == ("--model llava " not in line), line
    explicit = run("--dry-run", "--models", models[0], "--tasks", "gqa", "--methods", "none", "--log-dir", str(tmp_path),
                   env={"OTPRUNE_RECORDS": "off"})
    assert explicit.returncode == 0, explicit.stderr
    assert "OTPRUNE_RECORDS=auto" not in explicit.stdout  # the user's choice stands


@pytest.mark.parametrize(
    "config, model",
    [
        ({"model_type": "llava"}, "llava_hf"),
        ({"model_type": "llava_next"}, "llava_hf"),
        ({"model_type": "llava_onevision"}, "llava_hf"),
        ({"model_type": "qwen2_5_vl"}, "qwen2_5_vl"),
        ({"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "llava"),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "llava"),  # original format
    ],
)
def test_local_checkpoint_model_from_its_config(tmp_path, config, model):
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(config))
    result = run("--dry-run", "--models", str(local), "--tasks", "gqa", "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert option(argv, "--model") == model and option(argv, "--model_args") == f"pretrained={local}"


def test_local_folder_of_unknown_format(tmp_path):
    local = tmp_path / "mystery"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    result = run("--dry-run", "--models", str(local), "--tasks", "gqa")
    assert result.returncode == 2 and "model_type 'mllama'" in result.stderr
    result = run("--dry-run", "--models", str(local), "--tasks", "gqa", "--allow-unknown")
    assert result.returncode == 0 and f"--model llava --model_args pretrained={local}" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "FASTV"], "FASTV"),
        (["--methods", "VTW", "--vtw-layers", "2"], "VTW"),
        (["--methods", "OURS", "--layers", "0,2"], "layer 2"),
    ],
)
def test_hf_checkpoints_refuse_pruning_inside_the_llm(args, message):
    result = run("--dry-run", "--models", "liuhaotian/llava-v1.5-7b,llava-hf/llava-1.5-7b-hf", "--tasks", "gqa", *args)
    assert result.returncode == 2
    assert "llava-hf/llava-1.5-7b-hf" in result.stderr and message in result.stderr and "LAYER_INDEX=0" in result.stderr
    assert "-m lmms_eval" not in result.stdout


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
    (local / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": "clip"}))
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
    for flag in ("--models", "--tasks", "--methods", "--ratios", "--layers", "--gpus", "--log-dir", "--limit", "--dry-run", "--smoke",
                 "--fastv-layers", "--vtw-layers", "--fitprune-recipe", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER",
                 "llava_hf", "qwen2_5_vl", "FAILED"):
        assert flag in result.stdout, flag


# ---------------------------------------------------------------- issue #16: identity of models and runs


def test_models_sharing_a_basename_get_folders_of_their_own(tmp_path, fake_gpu_env):
    """/exp1/checkpoint-1000 and /exp2/checkpoint-1000, llava-hf/llava-1.5-7b-hf beside a local llava-1.5-7b-hf:
    every model runs, into a folder of its own."""
    env, log = fake_gpu_env
    import hashlib

    local = []
    for folder, config in (("exp1/checkpoint-1000", {"model_type": "llava_llama", "mm_vision_tower": "clip"}),
                           ("exp2/checkpoint-1000", {"model_type": "llava_llama", "mm_vision_tower": "clip"}),
                           ("mine/llava-1.5-7b-hf", {"model_type": "llava"})):
        path = tmp_path / folder
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        local.append(str(path))
    models = [*local, "llava-hf/llava-1.5-7b-hf"]
    logs = tmp_path / "logs"
    result = run("--models", ",".join(models), "--tasks", "gqa", "--log-dir", str(logs), "--no-report", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skip" not in result.stdout
    folders = [task_dir(call["output_path"]).parents[1].name for call in calls(log)]
    expected = [Path(model).name + "-" + hashlib.sha256(f"local:{model}".encode()).hexdigest()[:8] for model in local]
    assert folders == [*expected, hub_folder("llava-hf/llava-1.5-7b-hf")]
    assert len(set(folders)) == 4


def test_forced_run_that_fails_is_failed_even_beside_older_results(tmp_path, fake_gpu_env):
    env, log = fake_gpu_env
    args = ("--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(tmp_path / "logs"), "--no-report")
    assert run(*args, env=env).returncode == 0
    for behaviour in ("silent", "fail"):
        again = run("--force", *args, env={**env, "FAKE_LMMS": f"gqa={behaviour}"})
        assert again.returncode == 1, again.stdout + again.stderr
        (failed,) = [line for line in again.stderr.splitlines() if line.startswith("run_OTPrune.sh: FAILED:")]
        assert calls(log)[-1]["output_path"] in failed
    first, *forced = [call["output_path"] for call in calls(log)]
    assert len({first, *forced}) == 3  # a fresh folder per call


def test_run_info_is_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    link = tmp_path / "otprune_run.json"
    link.symlink_to(victim)
    import sys

    done = subprocess.run([sys.executable, "-m", "otprune.eval.atomic", str(link)], input='{"run_id": "x"}\n',
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "keep me" and not link.is_symlink()
    assert json.loads(link.read_text()) == {"run_id": "x"}
    assert "otprune.eval.atomic" in SCRIPT.read_text()  # the script writes otprune_run.json with it
def test_prumerge_adaptive_unless_a_ratio_is_given(tmp_path):
    common = ("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(tmp_path))
    adaptive = run(*common, "--methods", "PRUMERGE,PRUMERGE_PLUS,DIVPRUNE_STAR,OURS_STAR")
    assert adaptive.returncode == 0, adaptive.stderr
    assert set(settings_of(adaptive.stdout)) == {"prumerge_riqr_l0", "prumerge_plus_riqr_l0", "divprune_star_riqr_l0",
                                                 "ours_star_riqr_l0"}
    fixed = run(*common, "--methods", "PRUMERGE,OURS", "--ratios", "0.1")
    assert fixed.returncode == 0, fixed.stderr
    assert settings_of(fixed.stdout)["prumerge_r0.1_l0"] == ["BASELINE=PRUMERGE", "LAYER_INDEX=0", "SUBSET_RATIO=0.1"]
    table = run(*common, "--paper-table", "--ratios", "0.1")  # Table 1's PruMerge rows stay adaptive
    assert table.returncode == 0, table.stderr
    assert "prumerge_riqr_l0" in settings_of(table.stdout)


def test_smoke_takes_the_given_methods(tmp_path):
    result = run("--smoke", "--dry-run", "--methods", "none,PRUMERGE,OURS_STAR", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert set(settings_of(result.stdout)) == {"original", "prumerge_riqr_l0", "ours_star_riqr_l0"}


def test_hf_checkpoints_run_the_adaptive_rows_but_qwen_refuses(tmp_path):
    common = ("--dry-run", "--tasks", "gqa", "--methods", "PRUMERGE,OURS_STAR", "--log-dir", str(tmp_path))
    llava = run(*common, "--models", "llava-hf/llava-1.5-7b-hf")
    assert llava.returncode == 0, llava.stderr
    qwen = run(*common, "--models", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert qwen.returncode != 0 and "CLS token" in qwen.stderr
