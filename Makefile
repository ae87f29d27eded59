# Two commands on a fresh machine: `make demo` (set up + the offline pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FACES ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench screenshot serve status models ui stop clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so no other requirement can pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/facetrace demo $(if $(FACES),--faces $(FACES),)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py

screenshot: $(STAMP)
	$(PY) deployments/screenshot.py

serve: $(STAMP)
	$(VENV)/bin/facetrace serve

# Everyday verbs without activating the virtual environment.
status: $(STAMP)
	$(VENV)/bin/facetrace status

models: $(STAMP)
	$(VENV)/bin/facetrace models

# The Prefect UI of this data root (its background server; started if needed).
ui: $(STAMP)
	$(VENV)/bin/facetrace server start

stop: $(STAMP)
	$(VENV)/bin/facetrace server stop

clean:
	-test -x $(VENV)/bin/facetrace && $(VENV)/bin/facetrace server stop
	rm -rf $(VENV) data bench/latest.json
