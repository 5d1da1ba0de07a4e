# cnnserve — the commands people and CI run. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRITON_STAMP := .venv-tritonclient/.installed
PYTEST_ARGS ?=

.PHONY: help setup check test test-variants run bench bench-report gpu-check compose-smoke cluster-smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "cnnserve needs $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision come from the machine's local wheel cache when it has one (pinned in pyproject.toml).
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with pinned dependencies (idempotent) and the Fashion-MNIST package
	@.ci/install-system-packages

check: setup  ## ruff and mypy over the package; generated gRPC stubs must be current
	$(BIN)/ruff check service export tests protos
	$(BIN)/ruff format --check service export tests protos
	$(BIN)/mypy
	$(BIN)/python protos/generate.py --check

test: setup $(TRITON_STAMP)  ## the whole test suite (real TorchServe, real gRPC servers on loopback)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tritonclient, for tests/test_oip_clients.py, in a venv of its own (it needs protobuf < 7; cnnserve pins 7).
# Offline this step fails without stopping `make test`: those tests then skip saying why, or fail when
# CNNSERVE_REQUIRE_DATASETS=1 (CI). The tests' fixture builds it the same way when it is missing.
$(TRITON_STAMP): tests/oip_clients/requirements.txt | $(STAMP)
	-$(BIN)/python -m tests.oip_clients.venv

# What differs between machines, so that the suite holds on every one: AVX2 kernels instead of this CPU's
# AVX-512/AMX ones, one OpenMP thread, and a shuffled order (pytest-random-order; the seed is printed: rerun an
# order with RANDOM_ORDER_SEED=N).
RANDOM_ORDER_SEED ?= 10
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
SHUFFLED := --random-order-bucket=global --random-order-seed=$(RANDOM_ORDER_SEED)

test-variants: setup  ## the suite three more times: AVX2 kernels, one OMP thread, a seeded shuffled order
	$(AVX2_KERNELS) $(BIN)/python -m pytest -x $(PYTEST_ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -x $(PYTEST_ARGS)
	$(BIN)/python -m pytest -x $(SHUFFLED) $(PYTEST_ARGS)

run: setup  ## serve TorchServe + the gRPC gateway in the foreground (builds the default models once)
	$(BIN)/cnnserve serve

bench: setup  ## the full benchmark (10-25 min): writes docs/bench/results.json, README.md and plots
	$(BIN)/cnnserve bench --out docs/bench

bench-report: setup  ## re-render docs/bench/README.md and its plots from docs/bench/results.json
	$(BIN)/cnnserve bench --report-only --out docs/bench

GPU_CHECK_ARGS ?=
gpu-check: setup  ## on a CUDA machine (< 10 min, no network): GPU parity, latency, memory, pytest -m gpu
	$(BIN)/python -m cnnserve.gpu_check --out var/gpu-check $(GPU_CHECK_ARGS)

COMPOSE_SMOKE_ARGS ?=
compose-smoke:  ## build and boot the docker compose stack for real, call it, tear it down
	service/docker/compose-smoke.sh $(COMPOSE_SMOKE_ARGS)

cluster-smoke: setup  ## two replicas behind haproxy, one revision store, kill -9 of one (needs haproxy)
	$(BIN)/python -m cnnserve.cluster_smoke

clean:  ## remove the virtual environment and caches (keeps model_store)
	rm -rf $(VENV) .venv-tritonclient .pytest_cache .mypy_cache .ruff_cache
