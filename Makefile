# One source of truth for the project's commands; the README quotes these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install example test bench bench-fast bench-everyday clean

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

# Benchmarks append to benchmarks/RESULTS.md; InstEval and the crossed logistic
# model run lme4 too when Rscript and lme4 are installed (Debian: r-base-core
# r-cran-lme4). glmer takes about 45 minutes on 2 cores: `make bench-fast` skips it.
bench: $(STAMP)
	$(PY) benchmarks/bench_radon.py
	$(PY) benchmarks/bench_insteval.py
	$(PY) benchmarks/bench_levels.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_crossed.py

bench-fast: $(STAMP)
	$(PY) benchmarks/bench_radon.py
	$(PY) benchmarks/bench_insteval.py
	$(PY) benchmarks/bench_levels.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_crossed.py --no-glmer

# Every open reference case (and a synthetic series of 10k to 1M rows) with keras_glmm,
# lme4 (when Rscript and lme4 are installed) and GPBoost (the `bench` extra), in one run;
# lme4 is skipped above 100k synthetic rows (`--max-lme4-rows`).
bench-everyday: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_everyday.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
