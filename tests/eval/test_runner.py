"""`otprune run` (run_OTPrune.sh is a thin wrapper over it): planning, names, resume, failures, through the
real command. Runs that launch use a fake lmms-eval that writes its evidence with the real records writer
(`FAKE_LMMS`), so the runner's verification is the real one; the real lmms-eval runs are in
test_runner_e2e.py."""

import contextlib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from otprune.hf.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run_OTPrune.sh"
MODELS = ["liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b", "liuhaotian/llava-v1.6-vicuna-7b"]
TASKS = ["coco2017_cap_val", "flickr30k_test", "gqa", "mmbench_en_dev", "mme", "mmmu_val", "nocaps_val",
         "ok_vqa_val2014", "pope", "scienceqa_img", "seedbench"]
SWITCHES = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "MODELS", "TASKS", "METHODS", "RATIOS", "LAYERS", "LOG_DIR", "LIMIT",
            "NUM_GPUS", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER", "FITPRUNE_RECIPE", "FASTV_LAYERS", "VTW_LAYERS",
            "PYTHON", "OTPRUNE_RECORDS", "OTPRUNE_DISTANCE", "ENGINE", "DEVICE", "MODEL_ARGS", "BATCH_SIZE", "STUDY",
            "GAMMAS", "OTPRUNE_SERVE_PYTHON")
ME = "otprune run"


def run(*args, env=None, cwd=None, script=False):
    """`bash run_OTPrune.sh ARGS` (script=True), else the same `otprune run ARGS` in this process (the script
    only execs it; the in-process call saves the interpreter's start-up per test)."""
    environ = {key: value for key, value in os.environ.items() if key not in SWITCHES}
    environ.update(env or {})
    if script:
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, cwd=cwd)
    from otprune import cli

    out, err = io.StringIO(), io.StringIO()
    saved, here = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(["run", *args])
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 2
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


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
    """The task folder of a call's --output_path (LOG_DIR/<model>/<setting>/<task>-<spec hash>/run_<id>)."""
    path = Path(output_path)
    assert re.fullmatch(r"run_\d{8}_\d{6}_[0-9a-f]{8}", path.name), path
    assert re.fullmatch(r".+-[0-9a-f]{12}", path.parent.name), path
    return path.parent


def task_of(folder):
    """The task part of a task folder's name (without the spec hash)."""
    return Path(folder).name.rsplit("-", 1)[0]


def switches(line):
    """The VAR=value assignments of a dry-run line (after `env -u ...`), without the run id and records."""
    argv = shlex.split(line) if isinstance(line, str) else line
    return [arg for arg in argv[: argv.index("-m") - 1] if "=" in arg and arg.split("=")[0].isupper()
            and arg.split("=")[0] not in ("OTPRUNE_RUN_ID", "OTPRUNE_RECORDS", "CUDA_VISIBLE_DEVICES")]


def test_dry_run_covers_3_models_x_11_tasks(tmp_path):
    result = run("--dry-run", "--log-dir", str(tmp_path), script=True)
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    pairs = [(option(argv, "--model_args").removeprefix("pretrained="), option(argv, "--tasks")) for argv in lines]
    assert sorted(pairs) == sorted(itertools.product(MODELS, TASKS))
    for line in result.stdout.splitlines():
        if "-m lmms_eval" not in line:
            continue
        # Self-contained: every switch unset, then this setting's, the run id, and the README's command form.
        assert line.startswith("env -u BASELINE -u LAYER_INDEX -u SUBSET_RATIO ")
        assert switches(line) == ["BASELINE=OURS", "LAYER_INDEX=0", "SUBSET_RATIO=0.098"]
        assert re.search(r" OTPRUNE_RUN_ID=\d{8}_\d{6}_[0-9a-f]{8} ", line)
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
    unpruned = [line for line in lines if not switches(line)]
    assert len(unpruned) == 2
    assert sum(switches(line) == ["BASELINE=DIVPRUNE", "LAYER_INDEX=0", "SUBSET_RATIO=0.25"] for line in lines) == 2
    outputs = {option(shlex.split(line), "--output_path") for line in lines}
    assert len(outputs) == 6  # one folder per run
    assert str(tmp_path / hub_folder("liuhaotian/llava-v1.5-13b") / "divprune_r0.25_l0" / "gqa_limit8") in {
        str(task_dir(out)).rsplit("-", 1)[0] for out in outputs}


def test_paper_group_name_expands_to_the_11_tasks():
    result = run("--dry-run", "--tasks", "otprune_paper", "--models", MODELS[0])
    assert sorted(option(argv, "--tasks") for argv in commands(result.stdout)) == sorted(TASKS)


# ---------------------------------------------------------------- real runs with a fake lmms-eval

FAKE_LMMS = """
import json, os, sys, time
from types import SimpleNamespace

from otprune.config import PruneConfig
from otprune.eval.records import RecordWriter, result_settings
from otprune.eval.runspec import RunSpec

args = sys.argv[sys.argv.index("lmms_eval") + 1:] if "lmms_eval" in sys.argv else sys.argv[1:]
argv = ["lmms_eval", *args]
def value(name):
    return args[args.index(name) + 1]
out, task = value("--output_path"), value("--tasks")
env = {k: os.environ.get(k) for k in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED",
                                       "OTPRUNE_ORDER", "FITPRUNE_RECIPE", "OTPRUNE_RUN_ID", "OTPRUNE_RECORDS")}
with open(os.environ["FAKE_LMMS_LOG"], "a") as log:
    log.write(json.dumps({"task": task, "output_path": out, "argv": args, "env": env}) + "\\n")
behaviour = dict(item.split("=") for item in os.environ.get("FAKE_LMMS", "").split(",") if item).get(task, "ok")
print("fake lmms-eval", task, behaviour)
if behaviour == "fail":
    sys.exit(3)
writer = RecordWriter.from_env(argv=argv)
if behaviour != "norecords":  # "norecords": as lmms-eval's own class runs when our entry point did not load
    writer.start(RunSpec.from_process(argv))
config = PruneConfig.from_env()
settings = result_settings(config)
documents = 2
for doc in range(documents):
    if behaviour == "norecords":
        break
    writer.account([SimpleNamespace(request_type="generate_until", task_name=task, doc_id=doc)])
    pruned = config.enabled and behaviour != "unpruned"
    kept = 16 if not pruned or settings["ratio"] in (None, "iqr") else max(1, round(16 * settings["ratio"]))
    stats = {"method": settings["method"] if pruned else None, "layer": settings["layer"] if pruned else None,
             "ratio": settings["ratio"] if pruned else None, "visual_tokens_before": 16, "visual_tokens_after": kept,
             "seq_len_before": 26, "seq_len_after": 10 + kept, "text_tokens": 10, "select_ms": 1.0, "prefill_ms": 5.0}
    writer.write(stats, hidden=64, intermediate=128, layers=32, prune=config if pruned else None)
if behaviour == "silent":  # lmms-eval logs the model's exception and exits 0 without results
    print("Error during evaluation: The size of tensor a (4) must match the size of tensor b (5)", file=sys.stderr)
    writer.close()
    sys.exit(0)
folder = os.path.join(out, os.path.basename(os.path.dirname(str(writer.path)))) if writer.path else out
os.makedirs(folder, exist_ok=True)
results = {task: {"alias": task, "exact_match,none": 0.25}}
with open(os.path.join(folder, time.strftime("%Y%m%d_%H%M%S") + "_results.json"), "w") as file:
    json.dump({"results": results, "n-samples": {task: {"original": documents, "effective": documents}},
               "config": {"model_args": value("--model_args")}}, file)
writer.close()
"""


@pytest.fixture
def fake_gpu_env(tmp_path):
    """PATH with a fake nvidia-smi, PYTHON = a wrapper that runs FAKE_LMMS for `-m accelerate.commands.launch` and
    `-m lmms_eval`."""
    import sys

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    (bin_dir / "fake_lmms.py").write_text(FAKE_LMMS)
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "${1:-}" == -m && ( "${2:-}" == accelerate.commands.launch || "${2:-}" == lmms_eval ) ]]; then\n'
        f'    exec {shlex.quote(sys.executable)} {shlex.quote(str(bin_dir / "fake_lmms.py"))} "$@"\n'
        "fi\n"
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


def failed_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith(f"{ME}: FAILED:")]


def test_resume_skips_verified_runs_only(tmp_path, fake_gpu_env):
    env, log = fake_gpu_env
    args = ("--models", MODELS[0], "--tasks", "gqa,pope", "--log-dir", str(tmp_path), "--no-report")
    first = run(*args, env={**env, "FAKE_LMMS": "pope=unpruned"})
    assert first.returncode == 1, first.stdout + first.stderr
    (failed,) = failed_lines(first.stderr)
    assert "do not show the spec's pruning" in failed and "pope" in failed
    dry = run("--dry-run", *args, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "skip (verified run exists)" in dry.stdout
    assert "again (no verified run:" in dry.stdout
    assert [option(argv, "--tasks") for argv in commands(dry.stdout)] == ["pope"]
    forced = run("--dry-run", "--force", *args, env=env)
    assert len(commands(forced.stdout)) == 2


def test_runs_without_proof_fail_the_script_and_are_retried(tmp_path, fake_gpu_env):
    env, log = fake_gpu_env
    logs = tmp_path / "logs"
    args = ("--models", MODELS[0], "--tasks", "gqa,pope,mme,seedbench,ok_vqa_val2014", "--methods", "VTW",
            "--vtw-layers", "2", "--log-dir", str(logs), "--no-report")
    first = run(*args, env={**env, "FAKE_LMMS": "pope=silent,mme=fail,seedbench=norecords,ok_vqa_val2014=unpruned"})
    assert first.returncode == 1, first.stdout + first.stderr
    assert [call["task"] for call in calls(log)] == ["gqa", "pope", "mme", "seedbench", "ok_vqa_val2014"]
    summary = failed_lines(first.stderr)
    assert len(summary) == 4, "\n".join(summary)
    base = logs / hub_folder(MODELS[0]) / "vtw_l2"
    runs = {call["task"]: Path(call["output_path"]) for call in calls(log)}
    whys = ("no lmms-eval results file written by this run", "lmms-eval exited 3", "no pruning records",
            "records do not show the spec's pruning (vtw)")
    for line, task, why in zip(summary, ("pope", "mme", "seedbench", "ok_vqa_val2014"), whys, strict=True):
        assert str(runs[task]) in line and why in line and str(runs[task] / "lmms_eval.log") in line
        assert task_dir(runs[task]).parent == base and task_of(task_dir(runs[task])) == task
    assert "4 of 5 runs failed" in first.stderr
    assert not any(str(base) + "/gqa" in line for line in summary)
    assert calls(log)[0]["env"]["OTPRUNE_RUN_ID"] == runs["gqa"].name.removeprefix("run_")
    assert len({call["env"]["OTPRUNE_RUN_ID"] for call in calls(log)}) == 5  # one id per call
    assert calls(log)[0]["env"]["BASELINE"] == "VTW" and calls(log)[0]["env"]["SUBSET_RATIO"] is None
    assert not (runs["gqa"] / "otprune_run.json").exists()  # the runner writes no label: the process proves it

    log.write_text("")
    second = run(*args, env=env)  # resume: only the failed runs run again
    assert second.returncode == 0, second.stdout + second.stderr
    assert [call["task"] for call in calls(log)] == ["pope", "mme", "seedbench", "ok_vqa_val2014"]
    assert "skip (verified run exists)" in second.stdout and "FAILED" not in second.stderr


def test_gamma_sweep_runs_are_not_skipped(tmp_path, fake_gpu_env):
    env, log = fake_gpu_env
    logs = tmp_path / "logs"
    args = ("--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(logs), "--no-report")
    assert run(*args, env={**env, "OTPRUNE_GAMMA": "0.01"}).returncode == 0
    second = run(*args, env={**env, "OTPRUNE_GAMMA": "0.05"})
    assert second.returncode == 0, second.stderr
    assert "skip" not in second.stdout
    assert [(call["env"]["OTPRUNE_GAMMA"], task_dir(call["output_path"]).parent.name) for call in calls(log)] == [
        ("0.01", "otprune_r0.098_l0"), ("0.05", "otprune_r0.098_l0_g0.05")]


# ---------------------------------------------------------------- methods and their layers


def settings_of(stdout):
    """{setting folder: the pruning variables in front of its command} of a dry run."""
    found = {}
    for argv in commands(stdout):
        out = task_dir(option(argv, "--output_path"))
        found[out.parent.name] = switches(argv)
    return found


def test_every_method_with_its_default_layer_in_one_call(tmp_path):
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "none,OURS,FASTV,VTW",
                 "--vtw-layers", "16", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert settings_of(result.stdout) == {
        "original": [],
        "otprune_r0.098_l0": ["BASELINE=OURS", "LAYER_INDEX=0", "SUBSET_RATIO=0.098"],
        "fastv_r0.098_l2": ["BASELINE=FASTV", "LAYER_INDEX=2", "SUBSET_RATIO=0.098"],
        "vtw_l16": ["BASELINE=VTW", "LAYER_INDEX=16"],
    }


def test_layers_apply_to_the_methods_that_can_use_them(tmp_path):
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,FASTV,VTW",
                 "--layers", "0,3", "--ratios", "0.25,0.5", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(settings_of(result.stdout)) == sorted([
        "otprune_r0.25_l0", "otprune_r0.25_l3", "otprune_r0.5_l0", "otprune_r0.5_l3",
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
        assert tag.startswith("fitprune_recipe-") and found[tag] == ["BASELINE=FITPRUNE", f"FITPRUNE_RECIPE={recipe}"]
        assert len(found) == 3  # OURS x 2 ratios + one FitPrune run (its counts come from the recipe)


def test_settings_from_the_environment_name_the_run(tmp_path):
    env = {"OTPRUNE_GAMMA": "0.05", "OTPRUNE_SEED": "3", "OTPRUNE_ORDER": "official"}
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,RANDOM,DIVPRUNE,FASTV",
                 "--layers", "0", "--log-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert settings_of(result.stdout) == {
        "otprune_r0.098_l0_g0.05_official": ["BASELINE=OURS", "LAYER_INDEX=0", "SUBSET_RATIO=0.098", "OTPRUNE_GAMMA=0.05",
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
    # every run writes records: they are its evidence (the HF names write them only when asked)
    unpruned = [line for line in lines if "BASELINE=" not in line]
    assert len(unpruned) == 5
    assert all(" OTPRUNE_RECORDS=auto " in line for line in unpruned)
    explicit = run("--dry-run", "--models", models[0], "--tasks", "gqa", "--methods", "none", "--log-dir", str(tmp_path),
                   env={"OTPRUNE_RECORDS": "off"})
    assert explicit.returncode == 0, explicit.stderr
    assert " OTPRUNE_RECORDS=auto " in explicit.stdout and "-u OTPRUNE_RECORDS" in explicit.stdout


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
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
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
    assert "otprune.cli tiny-llava" in result.stdout and "otprune-smoke-model/tiny-llava" in result.stdout
    lines = commands(result.stdout)
    assert len(lines) == 2
    for argv in lines:
        assert option(argv, "--tasks") == "otprune_smoke"
        assert option(argv, "--model_args").endswith(",device=cpu,device_map=auto")
        assert option(argv, "--include_path") == str(ROOT / "lmms_eval" / "tasks")
        assert "CUDA_VISIBLE_DEVICES=" in argv and "accelerate.commands.launch" not in argv  # one CPU process
    assert "BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098" in result.stdout
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_without_gpu_it_points_to_the_smoke_test(tmp_path):
    result = run("--log-dir", str(tmp_path), "--tasks", "gqa", "--models", MODELS[0])
    assert result.returncode == 2
    assert "no GPU found" in result.stderr and "bash run_OTPrune.sh --smoke" in result.stderr
    assert "--device cpu" in result.stderr
    assert not any(tmp_path.iterdir())


def test_help():
    result = run("--help", script=True)
    assert result.returncode == 0
    for flag in ("--models", "--tasks", "--methods", "--ratios", "--layers", "--gpus", "--log-dir", "--limit", "--dry-run", "--smoke",
                 "--fastv-layers", "--vtw-layers", "--fitprune-recipe", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER",
                 "llava_hf", "qwen2_5_vl", "FAILED", "--device", "RunSpec", "--engine", "--model-args"):
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
    folders = [task_dir(call["output_path"]).parents[1].name for call in calls(log)]  # <model>/<setting>/<task>-<hash>
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
        (failed,) = failed_lines(again.stderr)
        assert calls(log)[-1]["output_path"] in failed
    first, *forced = [call["output_path"] for call in calls(log)]
    assert len({first, *forced}) == 3  # a fresh folder per call


def test_the_script_is_a_thin_wrapper():
    text = SCRIPT.read_text()
    assert len(text.splitlines()) < 100 and "otprune.cli run" in text
    assert "<<" not in text  # no here-document
    assert "python - " not in text and "python3 -" not in text and ".json" not in text  # no embedded Python, no JSON


def test_prumerge_adaptive_unless_a_ratio_is_given(tmp_path):
    common = ("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(tmp_path))
    adaptive = run(*common, "--methods", "PRUMERGE,PRUMERGE_PLUS,DIVPRUNE_STAR,OURS_STAR")
    assert adaptive.returncode == 0, adaptive.stderr
    assert set(settings_of(adaptive.stdout)) == {"prumerge_riqr_l0", "prumerge_plus_riqr_l0", "divprune_riqr_l0",
                                                 "otprune_riqr_l0"}
    fixed = run(*common, "--methods", "PRUMERGE,OURS", "--ratios", "0.1")
    assert fixed.returncode == 0, fixed.stderr
    assert settings_of(fixed.stdout)["prumerge_r0.1_l0"] == ["BASELINE=PRUMERGE", "LAYER_INDEX=0", "SUBSET_RATIO=0.1"]
    table = run(*common, "--paper-table", "--ratios", "0.1")  # Table 1's PruMerge rows stay adaptive
    assert table.returncode == 0, table.stderr
    assert "prumerge_riqr_l0" in settings_of(table.stdout)


def test_smoke_takes_the_given_methods(tmp_path):
    result = run("--smoke", "--dry-run", "--methods", "none,PRUMERGE,OURS_STAR", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert set(settings_of(result.stdout)) == {"original", "prumerge_riqr_l0", "otprune_riqr_l0"}


def test_hf_checkpoints_run_the_adaptive_rows_but_qwen_refuses(tmp_path):
    common = ("--dry-run", "--tasks", "gqa", "--methods", "PRUMERGE,OURS_STAR", "--log-dir", str(tmp_path))
    llava = run(*common, "--models", "llava-hf/llava-1.5-7b-hf")
    assert llava.returncode == 0, llava.stderr
    qwen = run(*common, "--models", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert qwen.returncode != 0 and "CLS token" in qwen.stderr


# ---------------------------------------------------------------- issue #21: identity and ownership


def test_model_args_naming_the_checkpoint_are_refused(tmp_path):
    """Case 3: `--model-args pretrained=OTHER` would evaluate OTHER under MODEL's name."""
    for key in ("pretrained", "model"):
        result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--model-args", f"{key}=other/model",
                     "--log-dir", str(tmp_path))
        assert result.returncode == 2 and f"'{key}=other/model' names the checkpoint" in result.stderr
        assert "--models" in result.stderr and commands(result.stdout) == []


def test_everything_that_changes_results_gets_its_own_folder(tmp_path, fake_gpu_env):
    """Case 5: engine, model args, batch size and extra lmms-eval arguments are part of the run's identity: a
    verified run of one never makes the runner skip another."""
    env, log = fake_gpu_env
    base = ("--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(tmp_path / "logs"), "--no-report")
    assert run(*base, env=env).returncode == 0
    folders = {task_dir(calls(log)[0]["output_path"])}
    for extra in (("--batch-size", "2"), ("--model-args", "attn_implementation=eager"), ("--", "--seed", "3")):
        again = run(*base, *extra, env=env)
        assert again.returncode == 0, again.stderr
        assert "skip" not in again.stdout
        folders.add(task_dir(calls(log)[-1]["output_path"]))
    assert len(folders) == 4
    same = run(*base, env=env)
    assert "skip (verified run exists)" in same.stdout and len(calls(log)) == 4
    vllm = run("--dry-run", "--engine", "vllm", "--models", "llava-hf/llava-1.5-7b-hf", "--tasks", "gqa", "--python",
               env["PYTHON"], "--log-dir", str(tmp_path / "logs"), env=env)
    hf = run("--dry-run", "--models", "llava-hf/llava-1.5-7b-hf", "--tasks", "gqa", "--log-dir", str(tmp_path / "logs"),
             env=env)
    (v,), (h,) = commands(vllm.stdout), commands(hf.stdout)
    assert task_dir(option(v, "--output_path")) != task_dir(option(h, "--output_path"))


def test_one_setting_named_twice_runs_once(tmp_path):
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--methods", "OURS,OTPRUNE,ours,none,original",
                 "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(settings_of(result.stdout)) == ["original", "otprune_r0.098_l0"]


def test_smoke_deletes_nothing_it_did_not_create(tmp_path):
    """Case 7: `--smoke --log-dir DIR` used to run `rm -rf DIR/checkpoint DIR/tiny-llava`."""
    logs = tmp_path / "logs"
    for name in ("checkpoint/tiny-llava/mine.txt", "tiny-llava/mine.txt", "otprune-smoke-model/tiny-llava/mine.txt"):
        (logs / name).parent.mkdir(parents=True, exist_ok=True)
        (logs / name).write_text("keep")
    result = run("--smoke", "--log-dir", str(logs))
    assert result.returncode == 2
    assert "otprune-smoke-model exists and was not made by otprune run --smoke" in result.stderr
    assert all((logs / name).read_text() == "keep" for name in
               ("checkpoint/tiny-llava/mine.txt", "tiny-llava/mine.txt", "otprune-smoke-model/tiny-llava/mine.txt"))


def test_w2_distance_without_pot_is_refused_before_any_run(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ot" else real(name, *a))
    result = run("--dry-run", "--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(tmp_path),
                 env={"OTPRUNE_DISTANCE": "w2"})
    assert result.returncode == 2, result.stdout
    assert "OTPRUNE_DISTANCE=w2" in result.stderr and "pip install 'otprune[analysis]'" in result.stderr
    assert commands(result.stdout) == []


def test_paths_with_tabs_and_quotes_stay_readable(tmp_path, fake_gpu_env):
    """Case 10: a TAB in a path made the bash-written otprune_run.json invalid JSON; now every file is written by
    Python (json / the records writer) and the run verifies."""
    env, log = fake_gpu_env
    logs = tmp_path / "with\ttab and 'quote'"
    result = run("--models", MODELS[0], "--tasks", "gqa", "--log-dir", str(logs), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    markdown = (logs / "otprune_report.md").read_text()
    assert "| llava-v1.5-7b" in markdown and "Unverified runs" not in markdown


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_hf_family_routes_by_model_type(tmp_path, family):
    """A checkpoint folder of each `otprune.hf` family runs through the lmms-eval name of its `Family`
    record (llava_onevision keeps its own kind: it is refused by --engine vllm, run by llava_hf)."""
    from otprune.eval.runner import checkpoint_format, lmms_model_of

    record = FAMILIES[family]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": record.model_type}))
    assert lmms_model_of(str(tmp_path), "hf", allow_unknown=False) == record.lmms_model
    assert checkpoint_format(tmp_path) == ("llava_onevision" if family == "onevision" else record.lmms_model)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
        ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"),
        ("Qwen/Qwen3-VL-30B-A3B-Thinking", "qwen3_vl"),
        ("Qwen/Qwen3.5-9B", "qwen3_5"),
        ("google/gemma-3-12b-it", "gemma3"),
        ("OpenGVLab/InternVL3-8B-hf", "internvl_hf"),
        ("OpenGVLab/InternVL3_5-8B-HF", "internvl_hf"),
    ],
)
def test_hub_ids_of_the_hf_families_route_without_allow_unknown(model, expected):
    from otprune.eval.runner import lmms_model_of

    assert lmms_model_of(model, "hf", allow_unknown=False) == expected


def test_internvl_in_its_remote_code_format_is_refused_with_the_hf_twin_named():
    from otprune.eval.runner import RunError, lmms_model_of

    with pytest.raises(RunError, match="OpenGVLab/InternVL3-8B-hf"):
        lmms_model_of("OpenGVLab/InternVL3-8B", "hf", allow_unknown=True)
    with pytest.raises(RunError, match="unknown model 'someone/else'.*Qwen/Qwen3-VL-"):
        lmms_model_of("someone/else", "hf", allow_unknown=False)
