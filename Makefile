# Set-up and the two main commands. TORCH_SPEC is installed first: pip would otherwise
# resolve a bare torch requirement to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

FRAMEWORKS ?= FrEIA==0.2 nflows==0.14 normflows==1.7.3 zuko==1.6.0

.PHONY: demo test docs lint venv clean gpu-site compat dist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks demo

test: $(STAMP)
	$(BIN)/ruff check klj_reg benchmarks tests examples
	$(BIN)/ruff format --check klj_reg benchmarks tests examples
	$(BIN)/mypy klj_reg
	TORCH_SPEC="$(TORCH_SPEC)" $(BIN)/python -m pytest

# The five frameworks' own test suites (../shared/peer-tests, run from there) with klj-reg
# attached to every model they build: tests/peer/klj_peer_plugin.py. Skipped, with a
# message, when ../shared/peer-tests is absent. PEER_ARGS go to each pytest run
# (--klj-baseline: the suites without klj-reg, for comparison).
peer-tests: $(STAMP)
	PYTEST=$(BIN)/pytest tests/peer/run $(PEER_ARGS)

# Tested version bounds: the adapter tests against the oldest versions pyproject.toml allows
# and against FrEIA master (../shared/frameworks), each row in its own environment under
# .compat/ (docs/compat.md). COMPAT_ROWS picks rows; COMPAT_FRESH=1 makes them again.
compat:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" tests/compat/run

# The documentation site (MkDocs + Material + mkdocstrings), strict: a warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

# The release artefacts in dist/: the sdist, and the wheel built from it, checked by twine.
# tests/release/test_wheel.py installs that wheel in a clean venv (KLJ_WHEEL=dist/...).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# The four frameworks (pure Python, no dependencies) for a GPU machine that has torch but not
# them: carry .gpu there and run benchmarks/gpu_check.sh.
gpu-site:
	$(PYTHON) -m pip install -q --no-deps --no-compile --upgrade --target .gpu/site $(FRAMEWORKS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
