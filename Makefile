# gradlens developer Makefile (pip + venv only).
#   make venv   create $(VENV) and install torch (CPU) + the package with [dev] extras
#   make test   ruff check + mkdocs build --strict + pytest without the slow tests (the suite a developer runs; aim:
#               under 10 minutes on 2 cores; extra pytest args: make test PYTEST_ARGS="-k store -x")
#   make test-slow  the tests marked slow: multi-process (DDP, FSDP2, ZeRO), notebooks, recipes, hub ids, benchmarks
#   make test-all   both, as CI runs them (.ci/run)
#   make demo   toy task -> record SFT and GRPO -> analyze -> placement contrast -> report.html, under $(DEMO_OUT)
#   make lint   ruff check
#   make docs   serve the docs site (mkdocs.yml, docs/) at http://127.0.0.1:8000; make docs-build builds it into site/
#   make clean  remove $(VENV) and build junk (keeps runs/)
#   make gpu-wheels  download the wheels a lent GPU machine lacks into gpu-wheels/ (see docs/gpu.md)

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= requirements/torch-cpu.txt
# Must match the torch pin in $(CONSTRAINTS) (pip fails loudly if they disagree).
TORCH_VERSION ?= 2.13.0
# Empty here: pip's find-links (/opt/wheels) supplies torch-2.13.0+cpu. On other machines use
#   make venv TORCH_INDEX_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX_ARGS ?=
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo

STAMP := $(VENV)/.installed

.PHONY: venv test test-slow test-all lint docs docs-build demo clean figures gpu-wheels
.DELETE_ON_ERROR:

venv: $(STAMP)

# Create the virtualenv only if it is missing.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

# (Re)install only when pyproject.toml or the constraints change; the stamp lives inside $(VENV).
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install $(TORCH_INDEX_ARGS) -c $(CONSTRAINTS) "torch==$(TORCH_VERSION)"
	$(VENV)/bin/python -m pip install $(TORCH_INDEX_ARGS) -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

lint: venv
	$(VENV)/bin/ruff check .

test: venv
	$(VENV)/bin/ruff check .
	$(MAKE) docs-build
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(VENV)/bin/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: test test-slow

# The docs site. --strict: a broken link, a page missing from the nav or a docstring mkdocstrings cannot read fails
# the build. NO_MKDOCS_2_WARNING silences Material's banner about MkDocs 2, which the pins in pyproject.toml exclude.
DOCS_ENV ?= NO_MKDOCS_2_WARNING=1
docs-build: venv
	$(DOCS_ENV) $(VENV)/bin/mkdocs build --strict --quiet

docs: venv
	$(DOCS_ENV) $(VENV)/bin/mkdocs serve

# Re-running replaces the previous demo runs (record refuses to overwrite a run without --resume). The demo ends with
# the headline: random against sign-consistent placement at one budget, both regimes, 3 seeds, rates swept on a fourth
# seed, on the tiny toy model (gradlens compare), then one HTML page of everything (gradlens report). One OpenMP
# thread per process: the toy models gain nothing from a second one, and oversubscribed threads slow them several-fold
# on a shared machine. About 3 minutes on 2 cores.
DEMO_ENV ?= OMP_NUM_THREADS=1
DEMO_COMPARE_FLAGS ?= --model toy:tiny --methods random sign --budgets 2% --seeds 0 1 2 --max_steps 40 \
	--probe_steps 8 --full_lrs 0.003 --sparse_lrs 0.03 0.1 --sweep_seeds 1000 --grid_extensions 0 --n_val 50 \
	--n_eval 200 --eval_samples 0 --no-export
demo: venv
	$(DEMO_ENV) $(VENV)/bin/gradlens toy base
	rm -rf $(DEMO_OUT)/sft $(DEMO_OUT)/grpo $(DEMO_OUT)/analysis $(DEMO_OUT)/compare $(DEMO_OUT)/report.html
	$(DEMO_ENV) $(VENV)/bin/gradlens record --regime sft --out $(DEMO_OUT)/sft --max_steps 40
	$(DEMO_ENV) $(VENV)/bin/gradlens record --regime grpo --out $(DEMO_OUT)/grpo --max_steps 40
	$(DEMO_ENV) $(VENV)/bin/gradlens analyze $(DEMO_OUT)/sft $(DEMO_OUT)/grpo --out $(DEMO_OUT)/analysis
	$(DEMO_ENV) $(VENV)/bin/gradlens compare --out $(DEMO_OUT)/compare $(DEMO_COMPARE_FLAGS)
	$(DEMO_ENV) $(VENV)/bin/gradlens report $(DEMO_OUT)/sft $(DEMO_OUT)/grpo $(DEMO_OUT)/compare \
		--out $(DEMO_OUT)/report.html --title "gradlens demo"
	$(VENV)/bin/python scripts/demo_headline.py $(DEMO_OUT)/compare $(DEMO_OUT)/report.html

# make figures: run notebooks/*.ipynb headless in the full setting (see notebooks/README.md); the PNGs go to figures/,
# runs and tables to runs/notebooks/full/<notebook> (finished ones are reused), executed copies of the notebooks to
# runs/notebooks/full/executed (never back into notebooks/).
figures: venv
	GRADLENS_SETTING=full $(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
		--output-dir runs/notebooks/full/executed notebooks/*.ipynb

gpu-wheels: venv
	PYTHON=$(VENV)/bin/python bash scripts/gpu_wheels.sh

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .ruff_cache
	find . -path ./runs -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
