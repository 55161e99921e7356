# mlflow-guard: `make serve` runs the gateway in front of an embedded MLflow; `make test` runs
# every check. Both set up what they need: a virtualenv in .venv and, for the tests, Debian's
# postgresql package (the suite starts its own throwaway cluster from it).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
SOURCES := guard server tests bench

.PHONY: serve test lint bench system-packages clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv"; $(APT) update -q && $(APT) install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,postgresql,test]'
	touch $@

system-packages:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing Debian's postgresql for the throwaway test cluster"; \
	  $(APT) update -q && $(APT) install -y -q postgresql; \
	fi

serve: $(STAMP)
	$(BIN)/mlflow-guard serve

lint: $(STAMP)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy

test: $(STAMP) system-packages lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m bench.authz
	$(BIN)/python -m bench.proxy
	$(BIN)/python -m bench.audit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
