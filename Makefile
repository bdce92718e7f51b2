# One source of truth for the project's commands; the README quotes these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install example test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

example: $(STAMP)
	$(PY) examples/radon.py

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks append to benchmarks/RESULTS.md; InstEval runs lme4 too when Rscript
# and lme4 are installed (Debian: r-base-core r-cran-lme4).
bench: $(STAMP)
	$(PY) benchmarks/bench_radon.py
	$(PY) benchmarks/bench_insteval.py
	$(PY) benchmarks/bench_levels.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
