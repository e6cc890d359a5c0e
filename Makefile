# The README's two commands: `make demo` (main job) and `make test` (whole suite).
# Both create .venv from the pinned constraints when it is missing or out of date.
PYTHON ?= python3
RANKS ?= 2
WHEELS ?= out/wheelhouse
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo megatron-demo sweep test lint venv wheelhouse gpu-check gpu-check-dry-run

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), "muon_ds CI needs Python >= 3.12 (megatron-core); see .python-version"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,demo,deepspeed,megatron]"
	touch $(STAMP)

# DeepSpeed ZeRO-1 on $(RANKS) CPU ranks: muon_ds vs AdamW, curves and communication.
demo: $(STAMP)
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus $(RANKS) --module launch.train_deepspeed $(DEMO_ARGS)

# Megatron's own pretrain() on 4 CPU ranks (TP=2 x DP=2, gloo), --optimizer muon (muon_ds).
megatron-demo: $(STAMP)
	PYTHON=$(PY) launch/megatron/train_cpu.sh $(MEGATRON_ARGS)

# Single process: each optimizer at the best lr of a small sweep (how the demo's lrs were chosen).
sweep: $(STAMP)
	$(PY) -m launch.demo $(SWEEP_ARGS)

# Offline wheels for the GPU check in $(WHEELS): muon_ds, DeepSpeed, Megatron-core and what
# they need beyond a CUDA PyTorch image (Python 3.12, x86-64 manylinux; never torch/triton).
wheelhouse: $(STAMP)
	$(PY) -m benchmarks.wheelhouse --out $(WHEELS)

# The GPU check on one CUDA GPU, offline: the wheelhouse installed into a private folder,
# the machine's own torch and triton. Writes out/gpu_check/report.md and results.json.
gpu-check:
	bash benchmarks/gpu_check/install_wheels.sh $(WHEELS) out/gpu_check/site
	PYTHONPATH=$(CURDIR)/out/gpu_check/site $(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# Every part of the GPU check on this CPU at toy sizes (what CI runs as a test).
gpu-check-dry-run: $(STAMP)
	$(PY) -m benchmarks.gpu_check --dry-run $(GPU_CHECK_ARGS)

test: $(STAMP)
	$(PY) -m ruff check muon_ds tests benchmarks launch
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check muon_ds tests benchmarks launch
	$(PY) -m ruff format --check muon_ds tests benchmarks launch
