#!/usr/bin/env bash
# The OTPrune paper benchmark through lmms-eval, then the results table: a thin wrapper over
# `otprune run` (otprune/eval/runner.py), which plans, names, launches, resumes, verifies and reports.
#
#   bash run_OTPrune.sh                       # 3 models x 11 tasks, OTPrune at r=0.098, layer 0 (GPUs)
#   bash run_OTPrune.sh --dry-run             # print the lmms-eval commands (self-contained) only
#   bash run_OTPrune.sh --methods none,OURS,DIVPRUNE --ratios 0.098,0.25 --models liuhaotian/llava-v1.5-7b
#   bash run_OTPrune.sh --methods OURS,FASTV,VTW --vtw-layers 16 --models liuhaotian/llava-v1.5-7b
#   bash run_OTPrune.sh --models llava-hf/llava-1.5-7b-hf,Qwen/Qwen2.5-VL-7B-Instruct   # --model llava_hf / qwen2_5_vl
#   bash run_OTPrune.sh --engine vllm --models llava-hf/llava-1.5-7b-hf   # lmms-eval --model vllm + the otprune plugin
#   bash run_OTPrune.sh --device cpu --models DIR --tasks otprune_smoke  # any setting on the CPU
#   bash run_OTPrune.sh --smoke               # whole pipeline on CPU: tiny checkpoint + otprune_smoke (make demo)
#
# Every option and environment variable: bash run_OTPrune.sh --help (= otprune run --help).
# The python that runs it: $PYTHON, else the checkout's .venv, else python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="python3"
fi
export PYTHON="$PY"
exec "$PY" -m otprune.cli run "$@"
