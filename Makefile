# megatrain: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# CPU machines get the CPU build of torch (an unpinned torch pulls several GB of CUDA packages);
# GPU machines get a normal requirement.
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
DEMO_NPROC ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l),2)
DEMO_DIR   ?= runs/demo

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/megatrain pretrain --config launch/configs/tiny-cpu.yaml --nproc-per-node $(DEMO_NPROC) run.dir=$(DEMO_DIR)
	@echo "metrics: $(DEMO_DIR)/metrics.jsonl  tensorboard: $(BIN)/tensorboard --logdir $(DEMO_DIR)/tb"
	@echo "a continuation from the model just trained:"
	$(BIN)/megatrain generate $(DEMO_DIR) --prompt "It is a truth universally acknowledged" --max-new-tokens 48 --temperature 0.8 --top-p 0.95

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/throughput.py --preset small-cpu --steps 20

clean:
	rm -rf $(VENV) runs .pytest_cache
