# `make demo` and `make test` set everything up themselves: a fresh clone needs nothing else.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.shardwise-installed
CACHE      ?= $(HOME)/.cache/shardwise
DEMO_TP    ?= 3

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

lint: setup
	$(PY) -m ruff check shardwise tests scripts

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) scripts/bench_load_table.py

clean:
	rm -rf $(VENV) build *.egg-info
