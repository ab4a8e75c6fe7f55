# revelio-nb: `make reproduce` runs every notebook headlessly, `make test` runs the test suite.
# Both create .venv first if it is missing (torch pinned to a CPU-safe 2.13.0, then the pinned set).

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= default
PYTEST_ARGS ?=
# extra runner arguments, e.g. ARGS="--force" (rerun up-to-date notebooks) or ARGS="--only 01 -p max_images=500"
ARGS   ?=

.PHONY: help venv test smoke reproduce readme-results lab bench browser-deps clean clean-cache

help:
	@echo "make reproduce   run every notebook (papermill) into results/$(RUN)/ (up-to-date ones are skipped; ARGS=--force reruns)"
	@echo "make readme-results  copy results/$(RUN)/ tables into README.md's results section"
	@echo "make smoke       the same notebooks with tiny parameters into results/smoke/"
	@echo "make test        the test suite"
	@echo "make lab         JupyterLab with widgets"
	@echo "make bench       benchmarks/*.py (RESULT lines)"

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(VPY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

test: venv
	$(VPY) -m pytest -q -ra $(PYTEST_ARGS)

smoke: venv
	$(VPY) -m revelio_nb.runner --run smoke --profile smoke $(ARGS)

reproduce: venv
	$(VPY) -m revelio_nb.runner --run $(RUN) $(ARGS)

readme-results: venv
	$(VPY) -m revelio_nb.report --run $(RUN) --readme README.md

lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

bench: venv
	@for b in benchmarks/*_bench.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

# Debian's Chromium for the real-browser tests (playwright drives the system browser; no browser download).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: browser tests will skip"

clean:
	rm -rf results/smoke .pytest_cache

clean-cache:
	rm -rf data/cache
