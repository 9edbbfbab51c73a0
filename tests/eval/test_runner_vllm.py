"""otprune run (run_OTPrune.sh) --engine vllm: Hugging Face-format LLaVA-1.5 / LLaVA-NeXT checkpoints go through
lmms-eval's --model vllm with the serve venv's python and the switches in the environment; what the
plugin cannot prune is refused before anything runs. Dry runs only (the real run is in tests/serve)."""

import json
import re

import pytest
from test_runner import SCRIPT, commands, option, run

SERVE_PY = str(SCRIPT.parent / ".venv-serve" / "bin" / "python")


def tiny_folder(tmp_path, model_type, name="ckpt"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(folder)


def test_hf_checkpoints_run_lmms_eval_vllm_with_the_serve_python(tmp_path):
    result = run("--dry-run", "--engine", "vllm", "--models", "llava-hf/llava-1.5-7b-hf,llava-hf/llava-v1.6-vicuna-7b-hf",
                 "--methods", "none,OURS", "--ratios", "0.25", "--tasks", "gqa", "--model-args", "enforce_eager=True",
                 "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = commands(result.stdout)
    assert len(lines) == 4
    for argv in lines:
        start = argv.index("-m")
        assert argv[start - 1] == SERVE_PY and argv[start:start + 2] == ["-m", "lmms_eval"]
        assert "accelerate.commands.launch" not in argv  # vLLM starts its own processes
        assert option(argv, "--model") == "vllm"
        assert option(argv, "--model_args").startswith("model=llava-hf/llava-")
        assert option(argv, "--model_args").endswith(",enforce_eager=True")
        assert any(re.fullmatch(r"OTPRUNE_RUN_ID=\d{8}_\d{6}_[0-9a-f]{8}", arg) for arg in argv[:start])
    pruned = [argv for argv in lines if "BASELINE=OURS" in argv]
    assert len(pruned) == 2
    for argv in pruned:
        assert {"LAYER_INDEX=0", "SUBSET_RATIO=0.25"} <= set(argv[:argv.index("-m")])
        assert "/otprune_r0.25_l0/gqa-" in option(argv, "--output_path")
    unpruned = [argv for argv in lines if "BASELINE=OURS" not in argv]
    assert all("OTPRUNE_RECORDS=auto" in argv for argv in unpruned)


def test_python_option_and_env_and_gpus(tmp_path):
    folder = tiny_folder(tmp_path, "llava_next")
    result = run("--dry-run", "--engine", "vllm", "--models", folder, "--tasks", "otprune_smoke_gen", "--limit", "2",
                 "--python", "/opt/serve/bin/python", "--gpus", "2", "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert argv[argv.index("-m") - 1] == "/opt/serve/bin/python"
    assert option(argv, "--model_args") == f"model={folder},tensor_parallel_size=2"
    assert option(argv, "--limit") == "2"
    result = run("--dry-run", "--models", folder, "--tasks", "gqa", "--log-dir", str(tmp_path / "logs"),
                 env={"ENGINE": "vllm", "OTPRUNE_SERVE_PYTHON": "/env/python"})
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert argv[argv.index("-m") - 1] == "/env/python" and option(argv, "--model_args") == f"model={folder}"


def test_default_engine_is_unchanged(tmp_path):
    result = run("--dry-run", "--models", "llava-hf/llava-1.5-7b-hf", "--tasks", "gqa", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert option(argv, "--model") == "llava_hf" and "accelerate.commands.launch" in argv


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "liuhaotian/llava-v1.5-7b"], "'liuhaotian/llava-v1.5-7b' is an original-format LLaVA checkpoint"),
    (["--models", "Qwen/Qwen3.5-9B", "--allow-unknown"], "(lmms-eval model qwen3_5) is not pruned by the otprune vLLM plugin"),
    (["--models", "llava-hf/llava-1.5-7b-hf", "--methods", "FASTV"], "setting 'fastv_r0.098_l2' = FASTV (pruning inside the LLM"),
    (["--models", "llava-hf/llava-1.5-7b-hf", "--methods", "VTW", "--vtw-layers", "16"], "setting 'vtw_l16' = VTW"),
    (["--models", "llava-hf/llava-1.5-7b-hf", "--layers", "2"], "setting 'ours_r0.098_l2' = otprune at layer 2"),
    (["--models", "llava-hf/llava-1.5-7b-hf", "--methods", "OURS_STAR"], "setting 'ours_star_riqr_l0'"),
    (["--engine", "gpu"], "--engine: 'gpu' must be hf or vllm"),
    (["--smoke"], "--engine vllm: --smoke runs our llava package"),
])
def test_refused(tmp_path, args, message):
    full = ["--dry-run", "--tasks", "gqa", "--log-dir", str(tmp_path), "--engine", "vllm", *args]
    result = run(*full)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr, result.stderr
    assert commands(result.stdout) == []


def test_original_format_folder_is_refused(tmp_path):
    folder = tmp_path / "orig"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": "clip"}))
    result = run("--dry-run", "--engine", "vllm", "--models", str(folder), "--tasks", "gqa", "--log-dir", str(tmp_path))
    assert result.returncode == 2 and "is an original-format LLaVA checkpoint" in result.stderr, result.stderr


def test_missing_serve_python_is_named(tmp_path):
    result = run("--engine", "vllm", "--models", "llava-hf/llava-1.5-7b-hf", "--tasks", "gqa", "--python",
                 str(tmp_path / "nope"), "--log-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"'{tmp_path / 'nope'}' cannot import vllm, lmms_eval and otprune" in result.stderr
    assert "make serve-venv" in result.stderr


def test_the_plugins_newer_families_run_through_lmms_evals_vllm(tmp_path):
    for model in ("Qwen/Qwen2.5-VL-7B-Instruct", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "OpenGVLab/InternVL3-8B-hf",
                  "google/gemma-3-4b-it"):
        result = run("--dry-run", "--engine", "vllm", "--models", model, "--tasks", "gqa", "--log-dir", str(tmp_path),
                     "--allow-unknown")  # fmt: skip
        assert result.returncode == 0, result.stderr
        (argv,) = commands(result.stdout)
        assert option(argv, "--model") == "vllm" and option(argv, "--model_args") == f"model={model}"
    folder = tiny_folder(tmp_path, "internvl")  # a transformers-format InternVL folder, by config model_type
    result = run("--dry-run", "--engine", "vllm", "--models", folder, "--tasks", "gqa", "--log-dir", str(tmp_path / "l"))
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result.stdout)
    assert option(argv, "--model") == "vllm"
