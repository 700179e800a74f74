# megatrain: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# CPU machines get the CPU build of torch (an unpinned torch pulls several GB of CUDA packages);
# GPU machines get a normal requirement.
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.10,torch==2.13.0)
DEMO_NPROC ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l),2)
DEMO_DIR   ?= runs/demo

# make compat: the compile test (tests/kernels/test_compile_cuda.py) against the oldest Triton that
# pyproject allows, in a throwaway venv that sees the project venv's packages behind its own Triton.
# Only the compile checks: the CPU interpreter of Triton < 3.9 cannot run every kernel (rms_norm's
# backward loop), so the interpreter-based launcher check stays in make test.
COMPAT_TRITON ?= 3.6.0
COMPAT_VENV   ?= /tmp/megatrain-compat-triton-$(COMPAT_TRITON)
COMPAT_SAMPLE ?= 1

.PHONY: install demo test test-fast lint bench compat clean

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

# Two pytest workers (pytest-xdist), each file on one worker so that a file's module fixtures are built
# once: on 2 cores the multi-process tests leave a core idle often enough that this takes about 3/4 of
# the serial time. TEST_JOBS=0 runs the suite serially in one process.
TEST_JOBS ?= 2
PYTEST_JOBS := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

# pytest's own script, not `python -m pytest`: the repository root stays off sys.path (its kernels/ folder
# is megatrain.kernels, never a top-level `kernels`), so the tests run against the installed package.
test: install
	$(BIN)/pytest -q $(PYTEST_JOBS)

test-fast: install
	$(BIN)/pytest -q $(PYTEST_JOBS) -m "not slow"

# ruff (pyproject's [tool.ruff]: line length 120, pycodestyle + pyflakes): lint and formatting, checked only.
# `$(BIN)/ruff format . && $(BIN)/ruff check --fix .` applies them.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

compat: install
	rm -rf $(COMPAT_VENV)
	$(BIN)/python -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps "triton==$(COMPAT_TRITON)"
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(COMPAT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_megatrain.pth"
	$(COMPAT_VENV)/bin/python -c "import triton; assert triton.__version__ == '$(COMPAT_TRITON)', triton.__version__"
	MEGATRAIN_COMPILE_SAMPLE=$(COMPAT_SAMPLE) $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-k "not launchers_take" tests/kernels/test_compile_cuda.py
	rm -rf $(COMPAT_VENV)

bench: install
	$(BIN)/python benchmarks/throughput.py --preset small-cpu --steps 20

clean:
	rm -rf $(VENV) runs .pytest_cache
