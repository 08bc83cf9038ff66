# The two commands of the README: `make demo` and `make test`. Both create .venv and
# install the pinned stack on first use (a stamp file makes later runs instant).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= jobs/configs/demo.yaml
PYTEST_ARGS ?=
ARGS ?=

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test bench lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/run_all.py --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
