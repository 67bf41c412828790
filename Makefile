# Two commands a newcomer needs: `make demo` (the TokFSM experiment) and `make test`.
# Both create .venv on first use: the CPU build of torch first (a bare `torch` requirement
# would pull a multi-GB CUDA build), then this package with its dev extra.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tl-codebook demo $(ARGS)

# The code browser's tests drive Debian's Chromium with playwright (playwright's own browser
# download is impossible offline; the tests launch the system chromium via executable_path).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

test: $(STAMP) chromium
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
