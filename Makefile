# Two commands a newcomer needs: `make demo` (the TokFSM experiment) and `make test`.
# Both create .venv on first use: the CPU build of torch first (a bare `torch` requirement
# would pull a multi-GB CUDA build), then this package with its dev extra.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tl-codebook demo $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tl_codebook tests benchmarks
	$(BIN)/ruff format --check tl_codebook tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy tl_codebook

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_snap.py

clean:
	rm -rf $(VENV) build *.egg-info
