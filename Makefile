# The README's commands. Everything lives in .venv; nothing is installed globally.
PYTHON     ?= python3
VENV       ?= .venv
# A plain `torch` pulls several GB of CUDA wheels on a CPU machine; pin the CPU build.
# GPU users: make install TORCH_SPEC="torch==2.11.0" (or whatever build fits their CUDA).
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= torch,jax,dev
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python -m textinv_cli.cli.demo

bench: install
	$(BIN)/python -m bench.run --cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
