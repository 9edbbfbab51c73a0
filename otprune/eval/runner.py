"""`otprune run`: the paper benchmark through lmms-eval, one verified run per model x setting x task,
then the report. `run_OTPrune.sh` passes its arguments here.

For every model x pruning setting x task the runner

1. plans: builds the lmms-eval command and its environment (only that setting's switches), and the
   `RunSpec` of that command (`RunSpec.from_command`, the same code the evaluating process runs on
   itself); the run folder is `LOG_DIR/<spec.folder()>/run_<id>`, a readable tag plus the spec's hash;
2. resumes: a run whose folder already holds a verified run of the same spec is skipped;
3. launches lmms-eval (accelerate on GPUs, one process with `--device cpu`, vLLM's own processes
   with `--engine vllm`), its output teed into `run_<id>/lmms_eval.log`;
4. checks the evidence that process wrote (`otprune.eval.evidence.verify`): its own spec, one
   pruning record per request, the results file it names; anything less is FAILED with the likely
   cause (e.g. an lmms_eval.models entry point of another package that does not load, after which
   lmms-eval skips ours) and the exit status is 1;
5. writes the report (`otprune report LOG_DIR`).

`--dry-run` prints the commands, each self-contained (its environment, run id, output folder): run
by hand they write the same evidence, so the report gives the same rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from otprune.eval import atomic, evidence
from otprune.eval.runspec import MODEL_KEYS, RunSpec, installed_versions, parse_model_args

ME = "otprune run"
ROOT = Path(__file__).resolve().parents[2]  # the checkout (run_OTPrune.sh, lmms_eval/tasks)
TASKS_DIR = ROOT / "lmms_eval" / "tasks"

PAPER_MODELS = ("liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b", "liuhaotian/llava-v1.6-vicuna-7b")
PAPER_TASKS = ("coco2017_cap_val", "flickr30k_test", "gqa", "mmbench_en_dev", "mme", "mmmu_val", "nocaps_val",
               "ok_vqa_val2014", "pope", "scienceqa_img", "seedbench")  # fmt: skip
SMOKE_TASKS = ("otprune_smoke", "otprune_smoke_gen", "otprune_smoke_mc")
HF_MODELS = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf",
             "llava-hf/llava-v1.6-vicuna-13b-hf", "llava-hf/llava-v1.6-mistral-7b-hf",
             "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
             "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-32B-Instruct",
             "Qwen/Qwen2.5-VL-72B-Instruct")  # fmt: skip
KNOWN_MODELS = (*PAPER_MODELS, "liuhaotian/llava-v1.6-vicuna-13b", *HF_MODELS)
# Hub-id prefixes of the families `otprune.hf` prunes -> lmms-eval's model name (any size, any release of them).
FAMILY_PREFIXES = {"Qwen/Qwen2.5-VL-": "qwen2_5_vl", "Qwen/Qwen3-VL-": "qwen3_vl", "Qwen/Qwen3.5-": "qwen3_5",
                   "google/gemma-3-": "gemma3", "OpenGVLab/InternVL3": "internvl_hf"}  # fmt: skip
PRUNING_VARS = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER",
                "FITPRUNE_RECIPE", "OTPRUNE_RECORDS", "OTPRUNE_RUN_ID")  # fmt: skip
FEATURE_METHODS = "OURS, DIVPRUNE, DPP, RANDOM, UNIFORM, FIRSTK, LASTK"
# Checkpoint kinds the otprune vLLM plugin prunes (otprune.serve.PRUNED: LLaVA-1.5 / NeXT, OneVision, Qwen2.5-VL,
# Qwen3-VL, InternVL (HF format), Gemma 3 images), run through lmms-eval's `--model vllm` with --engine vllm.
VLLM_KINDS = ("llava_hf", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "internvl_hf", "gemma3")
SMOKE_CHECKPOINT = "otprune-smoke-model"  # the folder --smoke owns inside the log folder
SMOKE_MARK = ".made-by-otprune-run"


class RunError(Exception):
    """A choice that cannot run; the message names the option (exit status 2)."""


# ----------------------------------------------------------------------------------------------- options
ENV = {  # option dest -> environment variables read as its default, first found wins
    "models": ("MODELS",), "tasks": ("TASKS",), "methods": ("METHODS", "BASELINE"), "study": ("STUDY",),
    "gammas": ("GAMMAS",), "ratios": ("RATIOS", "SUBSET_RATIO"), "layers": ("LAYERS", "LAYER_INDEX"),
    "fastv_layers": ("FASTV_LAYERS",), "vtw_layers": ("VTW_LAYERS",), "fitprune_recipe": ("FITPRUNE_RECIPE",),
    "gpus": ("NUM_GPUS",), "log_dir": ("LOG_DIR",), "limit": ("LIMIT",), "batch_size": ("BATCH_SIZE",),
    "engine": ("ENGINE",), "python": ("OTPRUNE_SERVE_PYTHON",), "model_args": ("MODEL_ARGS",), "device": ("DEVICE",),
}  # fmt: skip

EPILOG = f"""\
Runs, for every model x task x pruning setting, one lmms-eval call like the OTPrune README's:
  BASELINE=.. LAYER_INDEX=.. SUBSET_RATIO=.. python -m accelerate.commands.launch --num_processes=N \\
    -m lmms_eval --model llava --model_args pretrained=MODEL --tasks TASK --batch_size 1 \\
    --log_samples --output_path LOG_DIR/<model>/<setting>/<task>-<spec hash>/run_<id> --include_path lmms_eval/tasks
then the report (`otprune report LOG_DIR`: markdown + CSV + figures).

Every run is identified by its RunSpec: model (hub id or absolute path), engine, lmms-eval model, model
args, batch size, limit, task, extra lmms-eval arguments, method and all its parameters, OTPRUNE_DISTANCE,
and the versions of lmms-eval, transformers and otprune. Its folder is a readable tag plus a hash of the
spec, so anything that changes results gets a folder of its own. The lmms-eval process itself writes
its spec and one record per request with the pruning it applied; a run counts (is skipped on resume,
is a row of the report) only when those records prove it. Otherwise it is FAILED, with the likely cause,
and the exit status is 1.

Models: original-format LLaVA (liuhaotian/*, or a folder whose config.json has mm_vision_tower) run
through lmms-eval's --model llava (our llava package); Hugging Face-format ones through lmms-eval's own
--model llava_hf (model_type llava, llava_next, llava_onevision), qwen2_5_vl, qwen3_vl, qwen3_5, gemma3 or
internvl_hf (by config model_type: qwen2_5_vl, qwen3_vl, qwen3_5, gemma3, internvl), pruned by the same
switches before the LLM with the feature-selection methods. With --engine vllm, HF-format LLaVA-1.5 /
NeXT, OneVision, Qwen2.5-VL, Qwen3-VL, InternVL and Gemma 3 checkpoints run through lmms-eval's --model vllm with the serve
venv's python (make serve-venv); planning and the report stay in this python.

Methods (--methods, BASELINE values): OURS (= OTPrune), DIVPRUNE, DPP, RANDOM, UNIFORM, FIRSTK, LASTK; inside
the LLM: FASTV, VTW, FITPRUNE; none = unpruned; adaptive (Table 1, per-image IQR budget): PRUMERGE,
PRUMERGE_PLUS, DIVPRUNE_STAR, OURS_STAR (PRUMERGE / PRUMERGE_PLUS at each --ratios value when given).
--paper-table = none,VTW (with --vtw-layers),FASTV,DIVPRUNE,OURS,PRUMERGE,PRUMERGE_PLUS,DIVPRUNE_STAR,OURS_STAR.

Studies (--study): fig2 (LLaVA-1.5-7B: FIRSTK,LASTK,UNIFORM,RANDOM,DIVPRUNE at 0.098), fig3 (LLaVA-1.5-13B:
OURS,DIVPRUNE,DPP,RANDOM at 0.05..0.5), fig5 (three models, OURS at gammas 0.005..0.1), sota (OURS, DIVPRUNE,
CDPRUNER, VISIONZIP, DART at 64 / 128 / 192 tokens); with --smoke on the tiny checkpoint
(otprune/eval/studies.py).

--smoke: the whole pipeline on CPU in a few minutes: a tiny random checkpoint (built once into
LOG_DIR/{SMOKE_CHECKPOINT}, a folder it owns), task otprune_smoke, unpruned and OTPrune at 0.098 (or the
given --methods / --ratios / --study), then the report.

Environment only: OTPRUNE_GAMMA, OTPRUNE_SEED, OTPRUNE_ORDER, OTPRUNE_DISTANCE are passed to the runs of
the methods that use them; PYTHON is the python of the lmms-eval calls (default: this one).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otprune run", description="Evaluate models x pruning settings x tasks with lmms-eval, then report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--models", "--model", help=f"comma-separated hub ids or checkpoint folders [MODELS] (default: {','.join(PAPER_MODELS)})")
    add("--tasks", "--task", help="comma-separated lmms-eval tasks; otprune_paper = the paper's 11 [TASKS] (default: the 11)")
    add("--methods", "--method", help="BASELINE values, see below [METHODS, else BASELINE] (default: OURS)")
    add("--paper-table", action="store_true", help="the methods of the paper's Table 1")
    add("--study", help="fig2, fig3, fig5 or sota: the runs of one of the paper's analyses [STUDY]")
    add("--gammas", "--gamma", help="OTPrune's gammas, one OURS run each [GAMMAS] (default: OTPRUNE_GAMMA, else 0.01)")
    add("--ratios", "--ratio", help="kept fractions in (0, 1] [RATIOS, else SUBSET_RATIO] (default: 0.098)")
    add("--layers", "--layer", help="LAYER_INDEX values, 0 = before the LLM [LAYERS, else LAYER_INDEX] (default: 0)")
    add("--fastv-layers", "--fastv-layer", help="FastV's layers [FASTV_LAYERS] (default: the --layers >= 1, else 2)")
    add("--vtw-layers", "--vtw-layer", help="VTW's layers, >= 1 [VTW_LAYERS] (required with VTW unless --layers has one)")
    add("--fitprune-recipe", help="FitPrune's recipe file (otprune fitprune-calibrate) [FITPRUNE_RECIPE]")
    add("--gpus", "--num-gpus", help="processes for accelerate (data parallel) [NUM_GPUS] (default: the GPUs found)")
    add("--log-dir", "--log_dir", help="where results go [LOG_DIR] (default: ./logs, ./logs/smoke with --smoke)")
    add("--engine", help="hf (default: our llava / lmms-eval's HF models) or vllm [ENGINE]")
    add("--python", help="python of the lmms-eval calls with --engine vllm [OTPRUNE_SERVE_PYTHON] "
        "(default: .venv-serve/bin/python of the checkout)")  # fmt: skip
    add("--model-args", "--model_args", help="appended to every run's --model_args (not pretrained=/model=: "
        "that is --models) [MODEL_ARGS]")  # fmt: skip
    add("--limit", help="only the first N documents of each task (testing only) [LIMIT]")
    add("--batch-size", "--batch_size", help="lmms-eval --batch_size [BATCH_SIZE] (default 1, as in the paper)")
    add("--device", help="cpu: run every setting on the CPU, one process (tiny models, tests) [DEVICE] "
        "(default: the GPUs)")  # fmt: skip
    add("--allow-unknown", action="store_true", help="accept model and task names that are not in the known lists")
    add("--force", action="store_true", help="run again even when a verified run exists")
    add("--no-report", action="store_true", help="do not run the report at the end")
    add("--dry-run", action="store_true", help="print the commands (self-contained), run nothing")
    add("--smoke", action="store_true", help="the whole pipeline on CPU on a tiny checkpoint (= make demo)")
    add("extra", nargs=argparse.REMAINDER, help="-- then extra lmms-eval arguments")


def _env_defaults(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    for dest, names in ENV.items():
        if getattr(args, dest) in (None, ""):
            value = next((environ[name] for name in names if environ.get(name, "").strip()), None)
            setattr(args, dest, value)


# ----------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Planned:
    """One lmms-eval call: what to run, where, and the spec it must prove."""

    model: str
    setting: str  # runplan's tag (for messages)
    task: str
    argv: list[str]  # the lmms-eval command (program included)
    env: dict[str, str]  # the switches of this setting (+ OTPRUNE_RECORDS)
    spec: RunSpec
    folder: Path  # LOG_DIR/<spec.folder()>


@dataclasses.dataclass
class Plan:
    runs: list[Planned]
    log_dir: Path
    smoke_checkpoint: Path | None
    cpu: bool
    python: str


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def checkpoint_format(folder: Path) -> str:
    """llava | llava_hf | llava_onevision | lmms-eval's name of another `otprune.hf` family (qwen2_5_vl,
    qwen3_vl, qwen3_5, gemma3, internvl_hf: `Family.lmms_model`, by config `model_type`) from a
    checkpoint folder's config.json; RunError else."""
    from otprune.hf.families import FAMILIES

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"--models: no config.json in {folder}") from None
    except (OSError, ValueError) as err:
        raise RunError(f"--models: cannot read {path} ({err})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    refused = {"llava_mistral": "Mistral", "llava_mpt": "MPT", "llava_qwen": "Qwen", "llava_gemma": "Gemma"}
    if kind in refused:
        raise RunError(f"--models: '{folder}' is an original-format LLaVA checkpoint on {refused[kind]} (model_type "
                       f"{kind!r}), which our llava loader does not load")
    if isinstance(config, dict) and "mm_vision_tower" in config:
        return "llava"
    if kind in ("llava", "llava_next"):
        return "llava_hf"
    if kind == "llava_onevision":
        return "llava_onevision"
    routed = {record.model_type: record.lmms_model for record in FAMILIES.values()}
    if kind in routed:
        return routed[kind]
    raise RunError(f"--models: cannot tell which lmms-eval model runs '{folder}': its config.json has model_type "
                   f"{kind!r}, neither an original-format LLaVA (mm_vision_tower) nor one of {' / '.join(routed)}")


def family_of_hub_id(model: str) -> str | None:
    """lmms-eval's model name for a hub id of a family whose every checkpoint `otprune.hf` prunes, by its
    publisher's naming (`FAMILY_PREFIXES`: Qwen2.5-VL, Qwen3-VL, Qwen3.5, Gemma 3, InternVL3 / 3.5 in HF
    format, which ends in "-hf"); None for any other id. Such ids need no --allow-unknown."""
    for prefix, kind in FAMILY_PREFIXES.items():
        if model.startswith(prefix) and (kind != "internvl_hf" or model.lower().endswith("-hf")):
            return kind
    return None


def lmms_model_of(model: str, engine: str, allow_unknown: bool) -> str:
    """lmms-eval's --model for a checkpoint (hub id or folder) on `engine`."""
    if os.path.isdir(model):
        try:
            kind = checkpoint_format(Path(model))
        except RunError:
            if not allow_unknown:
                raise
            kind = "llava"
    elif model.startswith("liuhaotian/") and "mistral" in model.lower():
        raise RunError(f"--models: '{model}' is an original-format LLaVA checkpoint on Mistral, which our llava loader "
                       "does not load (use llava-hf/llava-v1.6-mistral-7b-hf)")
    elif model.startswith("liuhaotian/"):
        kind = "llava"
    elif model.startswith("llava-hf/"):
        kind = "llava_onevision" if "onevision" in model else "llava_hf"
    elif model.startswith("OpenGVLab/InternVL") and not family_of_hub_id(model):
        raise RunError(f"--models: '{model}' is an InternVL checkpoint in OpenGVLab's own format (remote code); "
                       "otprune.hf prunes transformers' InternVL: use its HF-format twin (e.g. "
                       "OpenGVLab/InternVL3-8B-hf, OpenGVLab/InternVL3_5-8B-HF)")
    elif family_of_hub_id(model):
        kind = family_of_hub_id(model)
    elif allow_unknown:
        kind = "llava"
    else:
        raise RunError(f"--models: unknown model '{model}' (not a known id and no such folder); known: "
                       f"{', '.join(KNOWN_MODELS)}, and any id starting with {', '.join(FAMILY_PREFIXES)}; "
                       "pass --allow-unknown to use it anyway")
    if model not in KNOWN_MODELS and not family_of_hub_id(model) and not os.path.isdir(model) and not allow_unknown:
        raise RunError(f"--models: unknown model '{model}'; known: {', '.join(KNOWN_MODELS)}; pass --allow-unknown")
    if engine == "vllm":
        if kind in VLLM_KINDS:
            return "vllm"
        if kind == "llava":
            raise RunError(f"--engine vllm: '{model}' is an original-format LLaVA checkpoint (our llava package); vLLM "
                           "runs Hugging Face-format ones (e.g. llava-hf/llava-1.5-7b-hf): use --engine hf for it")
        raise RunError(f"--engine vllm: '{model}' (lmms-eval model {kind}) is not pruned by the otprune vLLM plugin, "
                       "which covers LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, InternVL (HF format) "
                       "and Gemma 3 (images); "
                       "use --engine hf for it")
    return "llava_hf" if kind == "llava_onevision" else kind


def _check_hf_setting(model: str, lmms_model: str, method: str, layer: str, tag: str, engine: str) -> None:
    """HF-format checkpoints prune before the LLM with the feature-selection methods (and the adaptive rows on
    CLIP towers); RunError naming the setting otherwise."""
    if lmms_model == "llava" or method == "-":
        return
    if method in ("fastv", "vtw", "fitprune"):
        what = f"{method.upper()} (pruning inside the LLM, at layer {layer})"
    elif method in ("prumerge", "prumerge_plus"):
        if lmms_model == "llava_hf":
            return
        what = f"{method.upper()} (needs a CLIP tower's CLS token)"
    else:
        if layer == "0" and ("_riqr_" not in tag and not tag.endswith("_riqr") or lmms_model == "llava_hf"):
            return
        what = f"{method} at layer {layer} (or an adaptive budget, which needs a CLIP tower's CLS token)"
    if engine == "vllm":
        raise RunError(f"--engine vllm: setting '{tag}' = {what} is not available: the otprune vLLM plugin prunes "
                       f"before the LLM (LAYER_INDEX=0) with the feature-selection methods ({FEATURE_METHODS}) at a "
                       "fixed ratio; use --engine hf with an original-format checkpoint for it")
    raise RunError(f"--models: '{model}' is a Hugging Face-format checkpoint (lmms-eval model {lmms_model}), which for "
                   f"now prunes only before the LLM (LAYER_INDEX=0) with the feature-selection methods; setting "
                   f"'{tag}' = {what} is not available for it: leave it out, or run it on an original-format "
                   "checkpoint (e.g. liuhaotian/llava-v1.5-7b)")


def count_gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU"))


_VERSIONS: dict[tuple[str, str], dict] = {}


def versions_of(python: str, lmms_model: str, dry_run: bool = False) -> dict[str, str | None]:
    """The versions `RunSpec` records, as the lmms-eval process's python will see them (a dry run with a
    python that cannot tell: unknown, with a warning; the real run's folders then differ)."""
    key = (python, lmms_model)
    if key not in _VERSIONS:
        if os.path.realpath(python) == os.path.realpath(sys.executable):
            _VERSIONS[key] = installed_versions(lmms_model)
        else:
            code = ("import json, sys; from otprune.eval.runspec import installed_versions; "
                    "print(json.dumps(installed_versions(sys.argv[1])))")  # fmt: skip
            try:
                out = subprocess.run([python, "-c", code, lmms_model], capture_output=True, text=True, timeout=300)
                _VERSIONS[key] = json.loads(out.stdout) if out.returncode == 0 else {}
            except (OSError, ValueError, subprocess.SubprocessError):
                _VERSIONS[key] = {}
            if not _VERSIONS[key] and dry_run:
                print(f"{ME}: warning: '{python}' cannot tell the versions of lmms-eval, transformers, otprune "
                      "(part of every run's identity): the folders of this dry run differ from the real run's",
                      file=sys.stderr)
                _VERSIONS[key] = {name: None for name in installed_versions(lmms_model)}
            if not _VERSIONS[key]:
                raise RunError(f"--python: '{python}' cannot import otprune (its versions are part of every run's "
                               "identity); build the serve venv (make serve-venv) or give its python with --python")
    return _VERSIONS[key]


def make_plan(args: argparse.Namespace, environ: Mapping[str, str]) -> Plan:
    """Every run of `args` (validated; RunError naming the option on a bad choice)."""
    from otprune.eval import runplan, studies

    engine = (args.engine or "hf").strip().lower()
    if engine not in ("hf", "vllm"):
        raise RunError(f"--engine: '{args.engine}' must be hf or vllm (ENGINE)")
    if engine == "vllm" and args.smoke:
        raise RunError("--engine vllm: --smoke runs our llava package (--engine hf); for vLLM give --models, --tasks")
    device = (args.device or "").strip().lower() or None
    if device not in (None, "cpu", "cuda"):
        raise RunError(f"--device: '{args.device}' must be cpu or cuda (DEVICE)")
    cpu = device == "cpu" or args.smoke
    user_args = (args.model_args or "").strip().strip(",")
    given = parse_model_args(user_args)
    named = [key for key in MODEL_KEYS if key in given]
    if named:
        raise RunError(f"--model-args: '{named[0]}={given[named[0]]}' names the checkpoint; give it with --models "
                       "(a run's model is part of its identity)")
    methods, ratios, layers = args.methods, args.ratios, args.layers
    ratios_given, layers_given = bool(ratios), bool(layers)
    gammas = args.gammas or ""
    study_models = study_tasks = None
    if args.study:
        try:
            study = studies.get_study(args.study)
        except ValueError as err:
            raise RunError(str(err)) from None
        values = study.assignments(args.smoke)
        methods, ratios, layers, gammas = values["METHODS"], values["RATIOS"], values["LAYERS"], values["GAMMAS"]
        ratios_given, layers_given = False, False
        study_models, study_tasks = values.get("STUDY_MODELS"), values.get("STUDY_TASKS")
    log_dir = args.log_dir
    smoke_checkpoint = None
    if args.smoke:
        log_dir = log_dir or (f"logs/smoke_{args.study.lower()}" if args.study else "logs/smoke")
        if args.models:
            print(f"{ME}: --smoke uses its own tiny checkpoint; ignoring --models/MODELS", file=sys.stderr)
        smoke_checkpoint = Path(log_dir).resolve() / SMOKE_CHECKPOINT / "tiny-llava"
        models = [str(smoke_checkpoint)]
        tasks = ["otprune_smoke"]
        if not args.study:
            methods = methods if args.methods else "none,OURS"
            if not (args.methods and ratios_given):
                ratios, ratios_given = "0.098", False
        layers = "0"
    else:
        log_dir = log_dir or "logs"
        models = _split(args.models) or _split(study_models) or list(PAPER_MODELS)
        tasks = _split(args.tasks) or _split(study_tasks) or list(PAPER_TASKS)
        if args.paper_table:
            methods = "none" + (",VTW" if args.vtw_layers else "") + \
                ",FASTV,DIVPRUNE,OURS,PRUMERGE,PRUMERGE_PLUS,DIVPRUNE_STAR,OURS_STAR"
            ratios_given = False
        methods = methods or "OURS"
        ratios = ratios or "0.098"
        layers = layers or "0"
    task_list = []
    for task in tasks:
        if task in ("otprune_paper", studies.PAPER_TASKS):
            task_list += list(PAPER_TASKS)
        elif task in PAPER_TASKS or task in SMOKE_TASKS or args.allow_unknown:
            task_list.append(task)
        else:
            raise RunError(f"--tasks: unknown task '{task}'; known: otprune_paper ({','.join(PAPER_TASKS)}), "
                           f"{','.join(SMOKE_TASKS)}; pass --allow-unknown to run another lmms-eval task")
    task_list = list(dict.fromkeys(task_list))
    if not models:
        raise RunError("--models: empty")
    gpus = None
    if args.gpus:
        if not str(args.gpus).isdigit() or int(args.gpus) < 1:
            raise RunError(f"--gpus: '{args.gpus}' must be an integer >= 1")
        gpus = int(args.gpus)
    if args.limit is not None and (not str(args.limit).isdigit() or int(args.limit) < 1):
        raise RunError(f"--limit: '{args.limit}' must be an integer >= 1")
    batch_size = str(args.batch_size or "1")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise RunError(f"--batch-size: '{batch_size}' must be an integer >= 1")
    try:
        lines = list(runplan.plan_settings(methods, ratios, layers, layers_given, args.fastv_layers or "",
                                           args.vtw_layers or "", args.fitprune_recipe or "", ratios_given, gammas,
                                           {k: v for k, v in environ.items() if k not in PRUNING_VARS or
                                            k in ("OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER")}))  # fmt: skip
    except runplan.PlanError as err:
        raise RunError(str(err)) from None
    settings = []
    for line in lines:
        fields = line.split("\t")
        switches = dict(item.split("=", 1) for item in fields[4:])
        settings.append((fields[0], fields[1], fields[2], switches))
    if not settings:
        raise RunError("--methods: empty")

    python = environ.get("PYTHON") or sys.executable
    serve_python = args.python or str(ROOT / ".venv-serve" / "bin" / "python")
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    if gpus is None:
        gpus = 1 if cpu or engine == "vllm" or args.dry_run else max(1, count_gpus())
    runs = []
    for model in models:
        lmms_model = "llava" if args.smoke else lmms_model_of(model, engine, args.allow_unknown)
        for tag, method, layer, _ in settings:
            _check_hf_setting(model, lmms_model, method, layer, tag, engine)
        for tag, _method, _layer, switches in settings:
            for task in task_list:
                runs.append(_planned(model, lmms_model, tag, switches, task, user_args, batch_size, args.limit, extra,
                                     cpu, gpus, engine, python, serve_python, Path(log_dir), environ,
                                     args.dry_run))  # fmt: skip
    unique: dict[str, Planned] = {}
    for run in runs:  # one run per spec (OURS and OTPRUNE are one setting)
        unique.setdefault(run.spec.digest, run)
    return Plan(list(unique.values()), Path(log_dir), smoke_checkpoint, cpu, python if engine == "hf" else serve_python)


def _planned(model, lmms_model, tag, switches, task, user_args, batch_size, limit, extra, cpu, gpus, engine, python,
             serve_python, log_dir: Path, environ, dry_run) -> Planned:  # fmt: skip
    env = dict(switches)
    if not switches or lmms_model != "llava":
        env.setdefault("OTPRUNE_RECORDS", "auto")  # records of every run: they are its evidence
    device_args = ""
    if cpu and lmms_model != "vllm":  # our llava takes device=; lmms-eval's HF models device_map= and --device
        device_args = "device_map=cpu" if lmms_model != "llava" else "device=cpu,device_map=auto"
    model_key = "model" if lmms_model == "vllm" else "pretrained"
    pieces = [f"{model_key}={model}", device_args, user_args]
    if lmms_model == "vllm" and gpus > 1:
        pieces.append(f"tensor_parallel_size={gpus}")
    model_args = ",".join(piece for piece in pieces if piece)
    lmms_args = ["--model", lmms_model, "--model_args", model_args, "--tasks", task, "--batch_size", batch_size,
                 "--log_samples"]  # fmt: skip
    if limit is not None:
        lmms_args += ["--limit", str(limit)]
    if cpu and lmms_model not in ("vllm", "llava"):
        lmms_args += ["--device", "cpu"]
    lmms_args += extra
    if lmms_model == "vllm":
        launch = [serve_python, "-m", "lmms_eval"]
    elif cpu:
        launch = [python, "-m", "lmms_eval"]
    else:
        launch = [python, "-m", "accelerate.commands.launch", f"--num_processes={gpus}", "-m", "lmms_eval"]
    spec_env = {k: v for k, v in environ.items() if k not in PRUNING_VARS}
    spec_env.update(env)
    try:
        spec = RunSpec.from_command(lmms_args, spec_env, versions_of(serve_python if lmms_model == "vllm" else python,
                                                                     lmms_model, dry_run))  # fmt: skip
    except ValueError as err:
        raise RunError(str(err)) from None
    return Planned(model, tag, task, launch + lmms_args, env, spec, log_dir / spec.folder())


# ----------------------------------------------------------------------------------------------- run
def new_run_id() -> str:
    return f"{datetime.datetime.now():%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


def lmms_command(run: Planned, output: Path) -> list[str]:
    """The lmms-eval command of a run writing into `output`."""
    return [*run.argv, "--output_path", str(output), "--include_path", str(TASKS_DIR)]


def command_line(run: Planned, run_id: str, output: Path, cpu: bool = False) -> list[str]:
    """The self-contained command of a run: `env -u <switches> VAR=value ... <lmms-eval command>`."""
    unset = [arg for name in PRUNING_VARS for arg in ("-u", name)]
    assignments = [f"{k}={v}" for k, v in run.env.items()] + [f"OTPRUNE_RUN_ID={run_id}"]
    if cpu:
        assignments.append("CUDA_VISIBLE_DEVICES=")
    return ["env", *unset, *assignments, *lmms_command(run, output)]


def verified_in(folder: Path, spec: RunSpec) -> tuple[Path | None, list[str]]:
    """(a run folder under `folder` whose evidence proves `spec`, or None; the problems of the newest one)."""
    if not folder.is_dir():
        return None, ["no run yet"]
    newest: list[str] = ["no run yet"]
    for run_folder in sorted(folder.glob("run_*"), reverse=True):
        problems = check_run(run_folder, spec)
        if not problems:
            return run_folder, []
        if newest == ["no run yet"]:
            newest = problems
    return None, newest


def check_run(run_folder: Path, spec: RunSpec) -> list[str]:
    """Why the lmms-eval call that wrote `run_folder` does not prove `spec` (empty when it does)."""
    from otprune.eval.report.collect import find_result_files

    warnings: list[str] = []
    runs = evidence.scan(run_folder, warnings)
    results = {r.digest: r for r in find_result_files(run_folder, warnings) if r.digest}
    if not runs:
        return ["no pruning records" if spec.method is not None else "no records"]
    problems = []
    for run in runs:
        found = run.spec
        if found is not None and found.digest != spec.digest:
            problems.append("the process ran another spec than planned: " + "; ".join(spec.differences(found)))
            continue
        problems += evidence.verify(run, results, run_folder)
    return problems


def diagnose(python: str) -> str:
    """The likely cause of a run without records: broken lmms_eval.models entry points in `python`."""
    code = "from otprune.eval.evidence import broken_entry_points as b; print('\\n'.join(b()))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return ""
    broken = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not broken:
        return ""
    return ("the otprune entry point did not load; lmms-eval skipped entry points after a broken one: "
            + "; ".join(broken))  # fmt: skip


def make_smoke_checkpoint(path: Path, python: str, dry_run: bool) -> None:
    """Build the tiny checkpoint into the folder --smoke owns (LOG_DIR/otprune-smoke-model), once: the
    weights are seeded, so a later smoke run reuses it. A folder there that --smoke did not make is an
    error (nothing is deleted)."""
    owned = path.parent
    command = [python, "-m", "otprune.cli", "tiny-llava", str(path)]
    if dry_run:
        print(shlex.join(command))
        return
    if owned.exists():
        if not (owned / SMOKE_MARK).is_file():
            raise RunError(f"--smoke: {owned} exists and was not made by {ME} --smoke; it is left alone: give another "
                           "--log-dir")
        if (path / "config.json").is_file():
            print(f"== smoke: tiny checkpoint {path} (reused)")
            return
    owned.mkdir(parents=True, exist_ok=True)
    atomic.write_text(owned / SMOKE_MARK, "made by otprune run --smoke; removed only by you\n")
    print(f"== smoke: tiny checkpoint {path}")
    subprocess.run(command, check=True)


def launch(run: Planned, run_id: str, output: Path, cpu: bool) -> int:
    """Run one lmms-eval call, its output teed into output/lmms_eval.log; returns its exit status."""
    env = {k: v for k, v in os.environ.items() if k not in PRUNING_VARS}
    env.update(run.env)
    env["OTPRUNE_RUN_ID"] = run_id
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    argv = lmms_command(run, output)
    with open(output / "lmms_eval.log", "x", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=os.getcwd())  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def execute(plan: Plan, *, force: bool, dry_run: bool, report: bool) -> int:
    if plan.smoke_checkpoint is not None:
        make_smoke_checkpoint(plan.smoke_checkpoint, sys.executable, dry_run)
    total = len(plan.runs)
    models = len({run.model for run in plan.runs})
    print(f"== {total} lmms-eval runs ({models} models) -> {plan.log_dir}")
    failed: list[str] = []
    skipped = 0
    for index, run in enumerate(plan.runs, 1):
        head = f"[{index}/{total}]"
        if not force:
            done, why = verified_in(run.folder, run.spec)
            if done is not None:
                print(f"{head} skip (verified run exists): {done}")
                skipped += 1
                continue
            if why != ["no run yet"]:
                print(f"{head} again (no verified run: {why[0]}): {run.folder}")
        run_id = new_run_id()
        output = run.folder / f"run_{run_id}"
        if dry_run:
            print(shlex.join(command_line(run, run_id, output, plan.cpu)))
            continue
        print(f"{head} {run.model} / {run.setting} / {run.task} -> {output}")
        try:
            output.mkdir(parents=True, exist_ok=False)
        except OSError as err:
            print(f"{ME}: error: cannot create {output} ({err.strerror}); give another --log-dir", file=sys.stderr)
            return 1
        code = launch(run, run_id, output, plan.cpu)
        problems = check_run(output, run.spec)
        if code != 0:
            problems.insert(0, f"lmms-eval exited {code}")
        if problems and (cause := diagnose(plan.python)):
            problems.append(cause)
        if problems:
            failed.append(f"{output}: {'; '.join(problems)} (log: {output / 'lmms_eval.log'})")
            print(f"{ME}: run failed: {failed[-1]}", file=sys.stderr)
    report_cmd = [sys.executable, "-m", "otprune.cli", "report", str(plan.log_dir)]
    if dry_run:
        if report:
            print(shlex.join(report_cmd))
        return 0
    if skipped:
        print(f"== skipped {skipped} runs that are verified already (--force to run them again)")
    code = 0
    if report:
        print("== report")
        from otprune.eval.report import report_main

        try:
            code = report_main(plan.log_dir)
        except ValueError as err:
            print(f"otprune report: error: {err}", file=sys.stderr)
            code = 2
    if failed:
        print(f"{ME}: {len(failed)} of {total} runs failed (no verified run; they run again next time):",
              file=sys.stderr)
        for line in failed:
            print(f"{ME}: FAILED: {line}", file=sys.stderr)
        return 1
    return code


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    _env_defaults(args, environ)
    try:
        if (args.engine or "hf").strip().lower() == "vllm" and not args.dry_run:
            serve = args.python or str(ROOT / ".venv-serve" / "bin" / "python")
            try:
                check = subprocess.run([serve, "-c", "import vllm, lmms_eval, otprune"], capture_output=True)
            except OSError:
                check = None
            if check is None or check.returncode != 0:
                raise RunError(f"--engine vllm: '{serve}' cannot import vllm, lmms_eval and otprune; build the "
                               "serve venv (make serve-venv) or give its python with --python / OTPRUNE_SERVE_PYTHON")
        plan = make_plan(args, environ)
        if not plan.cpu and not args.dry_run and (args.engine or "hf") == "hf" and count_gpus() < 1:
            print(GPU_MESSAGE, file=sys.stderr)
            return 2
        return execute(plan, force=args.force, dry_run=args.dry_run, report=not args.no_report)
    except RunError as err:
        print(f"{ME}: error: {err}", file=sys.stderr)
        return 2


GPU_MESSAGE = f"""{ME}: no GPU found (nvidia-smi). The paper benchmark needs GPUs (LLaVA-7B/13B on 11
benchmarks). On this machine, run any setting on the CPU with --device cpu (tiny models), or the whole
pipeline on a tiny random checkpoint:

    bash run_OTPrune.sh --smoke        (or: make demo)

Use --dry-run to see the GPU commands."""


def run_from_argv(argv: Sequence[str]) -> int:
    parser = build_parser()
    return main(parser.parse_args(list(argv)))
