#!/usr/bin/env bash
# The OTPrune paper benchmark through lmms-eval, then the results table (`otprune report`).
#
#   bash run_OTPrune.sh                       # 3 models x 11 tasks, OTPrune at r=0.098, layer 0 (GPUs)
#   bash run_OTPrune.sh --dry-run             # print the lmms-eval commands only
#   bash run_OTPrune.sh --methods none,OURS,DIVPRUNE --ratios 0.098,0.25 --models liuhaotian/llava-v1.5-7b
#   bash run_OTPrune.sh --smoke               # whole pipeline on CPU: tiny checkpoint + otprune_smoke (make demo)
#
# Run `bash run_OTPrune.sh --help` for every option.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ME="run_OTPrune.sh"

PAPER_MODELS="liuhaotian/llava-v1.5-7b,liuhaotian/llava-v1.5-13b,liuhaotian/llava-v1.6-vicuna-7b"
PAPER_TASKS="coco2017_cap_val,flickr30k_test,gqa,mmbench_en_dev,mme,mmmu_val,nocaps_val,ok_vqa_val2014,pope,scienceqa_img,seedbench"
SMOKE_TASKS="otprune_smoke,otprune_smoke_gen,otprune_smoke_mc"
KNOWN_MODELS="$PAPER_MODELS,liuhaotian/llava-v1.6-vicuna-13b,liuhaotian/llava-v1.6-mistral-7b"

usage() {
    cat <<EOF
Usage: bash $ME [options] [-- extra lmms-eval arguments]

Runs, for every model x task x pruning setting, exactly the lmms-eval call of the OTPrune README:
  BASELINE=.. LAYER_INDEX=.. SUBSET_RATIO=.. python3 -m accelerate.commands.launch --num_processes=N \\
    -m lmms_eval --model llava --model_args pretrained=MODEL --tasks TASK --batch_size 1 \\
    --log_samples --output_path LOG_DIR/<model>/<setting>/<task> --include_path lmms_eval/tasks
then \`otprune report LOG_DIR\` (markdown + CSV + plot). Runs whose results exist are skipped.

Options (environment variable in brackets):
  --models LIST     comma-separated Hugging Face ids or local checkpoint folders [MODELS]
                    (default: the paper's $PAPER_MODELS)
  --tasks LIST      comma-separated lmms-eval tasks [TASKS] (default: the paper's 11;
                    'otprune_paper' = those 11; also otprune_smoke)
  --methods LIST    BASELINE values: OURS (= OTPrune), DIVPRUNE, DPP, RANDOM, UNIFORM, FIRSTK, LASTK, ...,
                    or 'none' for the unpruned model [METHODS, else BASELINE] (default: OURS)
  --ratios LIST     SUBSET_RATIO values, kept fraction in (0, 1] [RATIOS, else SUBSET_RATIO] (default: 0.098)
  --layers LIST     LAYER_INDEX values, 0 = before the LLM [LAYERS, else LAYER_INDEX] (default: 0)
  --method/--ratio/--layer   one value each (same as the lists)
  --gpus N          processes for accelerate (data parallel) [NUM_GPUS] (default: the number of GPUs)
  --log-dir DIR     where results go [LOG_DIR] (default: ./logs, ./logs/smoke with --smoke)
  --limit N         only the first N documents of each task (testing only) [LIMIT]
  --batch-size N    lmms-eval --batch_size [BATCH_SIZE] (default 1, as in the paper)
  --allow-unknown   accept model and task names that are not in the known lists
  --force           run again even when results exist
  --no-report       do not run \`otprune report\` at the end
  --dry-run         print the commands, run nothing
  --smoke           the whole pipeline on CPU in a few minutes: a fresh tiny random checkpoint
                    (\`otprune tiny-llava\`), task otprune_smoke, unpruned and
                    BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098, then the report (= make demo)
  -h, --help        this help

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
RATIOS="${RATIOS:-${SUBSET_RATIO:-}}"
LAYERS="${LAYERS:-${LAYER_INDEX:-}}"
NUM_GPUS="${NUM_GPUS:-}"
LOG_DIR="${LOG_DIR:-}"
LIMIT="${LIMIT:-}"
BATCH_SIZE="${BATCH_SIZE:-1}"
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
        --methods | --method) need_value "$@"; METHODS="$2"; shift 2 ;;
        --ratios | --ratio) need_value "$@"; RATIOS="$2"; shift 2 ;;
        --layers | --layer) need_value "$@"; LAYERS="$2"; shift 2 ;;
        --gpus | --num-gpus) need_value "$@"; NUM_GPUS="$2"; shift 2 ;;
        --log-dir | --log_dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
        --limit) need_value "$@"; LIMIT="$2"; shift 2 ;;
        --batch-size | --batch_size) need_value "$@"; BATCH_SIZE="$2"; shift 2 ;;
        --models=* | --tasks=* | --methods=* | --ratios=* | --layers=* | --gpus=* | --log-dir=* | --limit=* | --batch-size=* | \
        --model=* | --task=* | --method=* | --ratio=* | --layer=*)
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
    METHODS="none,OURS"
    RATIOS="0.098"
    LAYERS="0"
    NUM_GPUS=1
    MODEL_ARGS_EXTRA=",device=cpu,device_map=auto"
    export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false
    FORCE=1
else
    MODELS="${MODELS:-$PAPER_MODELS}"
    TASKS="${TASKS:-$PAPER_TASKS}"
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
IFS=',' read -r -a METHOD_LIST <<<"$METHODS"
IFS=',' read -r -a RATIO_LIST <<<"$RATIOS"
IFS=',' read -r -a LAYER_LIST <<<"$LAYERS"

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

for model in "${MODEL_LIST[@]}"; do
    [[ -n "$model" ]] || die "--models: empty name in '$MODELS'"
    if [[ $SMOKE -eq 1 ]] || contains "$KNOWN_MODELS" "$model" || [[ -d "$model" ]] || [[ $ALLOW_UNKNOWN -eq 1 ]]; then
        continue
    fi
    die "--models: unknown model '$model' (not a known LLaVA id and no such folder); known: $KNOWN_MODELS; pass --allow-unknown to use it anyway"
done

if [[ -n "$NUM_GPUS" ]]; then
    is_uint "$NUM_GPUS" && [[ "$NUM_GPUS" -ge 1 ]] || die "--gpus: '$NUM_GPUS' must be an integer >= 1"
fi
if [[ -n "$LIMIT" ]]; then
    [[ "$LIMIT" =~ ^[0-9]+$ && "$LIMIT" -ge 1 ]] || die "--limit: '$LIMIT' must be an integer >= 1"
fi
is_uint "$BATCH_SIZE" && [[ "$BATCH_SIZE" -ge 1 ]] || die "--batch-size: '$BATCH_SIZE' must be an integer >= 1"

# Pruning settings: "none" = unpruned; otherwise every method x ratio x layer, checked by
# otprune's own parser of the switches (the same code the model uses).
SETTINGS=()   # "METHOD RATIO LAYER" or "none"
for method in "${METHOD_LIST[@]}"; do
    case "${method,,}" in
        none | original | off | "") SETTINGS+=("none"); continue ;;
    esac
    for ratio in "${RATIO_LIST[@]}"; do
        for layer in "${LAYER_LIST[@]}"; do
            SETTINGS+=("$method $ratio $layer")
        done
    done
done
[[ ${#SETTINGS[@]} -gt 0 ]] || die "--methods: empty"

check_settings() {
    local setting method ratio layer checks=""
    for setting in "${SETTINGS[@]}"; do
        [[ "$setting" == "none" ]] && continue
        read -r method ratio layer <<<"$setting"
        checks+="check('$method', '$ratio', '$layer')"$'\n'
    done
    [[ -n "$checks" ]] || return 0
    "$PY" - <<EOF || exit 2
import os
import sys
try:
    from otprune.config import PruneConfig
except Exception as err:  # noqa: BLE001
    sys.exit(f"$ME: error: cannot import otprune with $PY ({err}); install it: pip install -e '.[eval]'")

def check(method, ratio, layer):
    try:
        PruneConfig.from_env({**os.environ, "BASELINE": method, "SUBSET_RATIO": ratio, "LAYER_INDEX": layer})
    except ValueError as err:
        sys.exit(f"$ME: error: {err}")

$checks
EOF
}
check_settings

# ---------------------------------------------------------------------------------------------
# GPUs.
count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ $SMOKE -eq 0 ]]; then
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
model_tag() {
    local name="${1%/}"
    echo "${name##*/}"
}

setting_tag() {  # setting_tag "METHOD RATIO LAYER" | none
    local method ratio layer
    if [[ "$1" == "none" ]]; then
        echo "original"
        return
    fi
    read -r method ratio layer <<<"$1"
    echo "${method,,}_r${ratio}_l${layer}"
}

has_results() {
    [[ -d "$1" ]] && [[ -n "$(find "$1" -name '*_results.json' -print -quit 2>/dev/null)" ]]
}

write_run_info() {  # write_run_info DIR MODEL TASK SETTING: what this run is, for `otprune report`
    local method="null" ratio="null" layer="null" m r l
    if [[ "$4" != "none" ]]; then
        read -r m r l <<<"$4"
        method="\"$m\""; ratio="\"$r\""; layer="\"$l\""
    fi
    printf '{"otprune_run": 1, "model": "%s", "task": "%s", "baseline": %s, "ratio": %s, "layer": %s}\n' \
        "$2" "$3" "$method" "$ratio" "$layer" >"$1/otprune_run.json"
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

TOTAL=$(( ${#MODEL_LIST[@]} * ${#TASK_LIST[@]} * ${#SETTINGS[@]} ))
echo "== $TOTAL lmms-eval runs: ${#MODEL_LIST[@]} models x ${#TASK_LIST[@]} tasks x ${#SETTINGS[@]} settings -> $LOG_DIR"
INDEX=0
FAILED=()
SKIPPED=0
for model in "${MODEL_LIST[@]}"; do
    for setting in "${SETTINGS[@]}"; do
        for task in "${TASK_LIST[@]}"; do
            INDEX=$((INDEX + 1))
            out="$LOG_DIR/$(model_tag "$model")/$(setting_tag "$setting")/$task${LIMIT:+_limit$LIMIT}"
            if [[ "$setting" == "none" ]]; then
                envs=(env -u BASELINE -u LAYER_INDEX -u SUBSET_RATIO)  # unpruned even if the shell exports them
                shown=("${envs[@]}")
            else
                read -r method ratio layer <<<"$setting"
                envs=(env "BASELINE=$method" "LAYER_INDEX=$layer" "SUBSET_RATIO=$ratio")
                shown=("BASELINE=$method" "LAYER_INDEX=$layer" "SUBSET_RATIO=$ratio")
            fi
            cmd=("$PY" -m accelerate.commands.launch "--num_processes=$NUM_GPUS" -m lmms_eval
                --model llava --model_args "pretrained=$model$MODEL_ARGS_EXTRA" --tasks "$task"
                --batch_size "$BATCH_SIZE" --log_samples --output_path "$out" --include_path "$TASKS_DIR")
            [[ -z "$LIMIT" ]] || cmd+=(--limit "$LIMIT")
            [[ ${#EXTRA[@]} -eq 0 ]] || cmd+=("${EXTRA[@]}")

            if [[ $FORCE -eq 0 ]] && has_results "$out"; then
                echo "[$INDEX/$TOTAL] skip (results exist): $out"
                SKIPPED=$((SKIPPED + 1))
                continue
            fi
            if [[ $DRY_RUN -eq 1 ]]; then
                quote "${shown[@]}" "${cmd[@]}"
                continue
            fi
            echo "[$INDEX/$TOTAL] $(model_tag "$model") / $(setting_tag "$setting") / $task"
            [[ $SMOKE -eq 0 ]] || rm -rf "$out"
            mkdir -p "$out"
            write_run_info "$out" "$model" "$task" "$setting"
            if "${envs[@]}" "${cmd[@]}" 2>&1 | tee "$out/lmms_eval.log"; then
                :
            else
                echo "$ME: run failed: $out (log: $out/lmms_eval.log)" >&2
                FAILED+=("$out")
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
if [[ $REPORT -eq 1 ]]; then
    echo "== report"
    "${REPORT_CMD[@]}"
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "$ME: ${#FAILED[@]} of $TOTAL runs failed:" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
    exit 1
fi
