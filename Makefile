# mlflow-guard: `make serve` runs the gateway in front of an embedded MLflow; `make test` runs
# every check. Both set up what they need on Debian or Ubuntu: the packages the virtualenv is
# built against (python-ldap compiles against libldap and libsasl2), the virtualenv in .venv and,
# for the tests, Debian's postgresql, slapd, ldap-utils and chromium (the suite starts its own
# throwaway PostgreSQL cluster, slapd and headless browser from them; no system service is used).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
SOURCES := guard server tests bench

# Debian packages the virtualenv is built against (python-ldap has no Linux wheels: pip compiles
# it, and it fails on a missing lber.h or sasl/sasl.h), and those the test suite starts.
BUILD_PACKAGES := gcc libldap2-dev libsasl2-dev
# chromium: the browser tests drive Debian's build through Playwright (never `playwright install`).
TEST_PACKAGES := postgresql slapd ldap-utils chromium
# The names in $(1) that dpkg does not list as installed, on one line.
missing = $$(echo $$(for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | \
	grep -q 'ok installed' || echo $$p; done))

.PHONY: serve test lint bench build-packages system-packages clean verify-mlflow mlflow-deps

# build-packages is order-only: it runs first every time (a quick dpkg check) but does not by
# itself make the virtualenv out of date.
$(STAMP): pyproject.toml | build-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,postgresql,test]'
	touch $@

build-packages:
	@need="$(call missing,$(BUILD_PACKAGES))"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || need="$$need python3-venv"; \
	$(PYTHON) -c 'import os, sys, sysconfig; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || need="$$need python3-dev"; \
	if [ -n "$${need// /}" ]; then \
	  echo "installing Debian packages to build the virtualenv:" $$need; \
	  $(APT) update -q && $(APT) install -y -q $$need; \
	fi

# The tests start slapd from a slapd.conf in a temporary directory (tests/conftest.py), never the
# packaged service: where the package's postinst starts that service (outside containers whose
# policy-rc.d forbids it), it is stopped and disabled again right after installing it.
system-packages:
	@need="$(call missing,$(TEST_PACKAGES))"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages the tests start: $$need"; \
	  $(APT) update -q && $(APT) install -y -q $$need || exit 1; \
	  if [[ " $$need " == *" slapd "* ]] && command -v systemctl >/dev/null \
	    && systemctl is-active --quiet slapd 2>/dev/null; then \
	    echo "stopping and disabling the packaged slapd service (the tests start their own)"; \
	    $(SUDO) systemctl disable --now slapd; \
	  fi; \
	fi

serve: $(STAMP)
	$(BIN)/mlflow-guard serve

lint: $(STAMP)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy

# The tests' OpenID Connect provider: oidc-provider, pinned by tests/idp/package-lock.json and
# installed with `npm ci` into tests/idp/node_modules (git-ignored). npm comes with the machine's
# Node.js; Debian's nodejs and npm are installed only when npm is missing, since they would
# replace a newer Node.
IDP_STAMP := tests/idp/node_modules/.installed
$(IDP_STAMP): tests/idp/package.json tests/idp/package-lock.json
	@command -v npm >/dev/null || { echo "installing Debian packages the tests start: nodejs npm"; \
	  $(APT) update -q && $(APT) install -y -q nodejs npm; }
	cd tests/idp && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# A second MLflow for the tests, beside the main venv's 3.17.2: mlflow 3.18.0 wants
# mlflow-tracing==3.18.0, which this project's package index does not carry yet, so its venv is
# the 3.17.2 dependency set (one committed file), mlflow-skinny 3.18.0, then mlflow 3.18.0
# without its dependencies. tests/integration/conftest.py starts its `mlflow server` from here.
MLFLOW_DEPS := tests/mlflow_routes/deps-3.17.2.txt
MLFLOW_NEXT := 3.18.0
NEXT_VENV := .venv-mlflow-3.18
NEXT_STAMP := $(NEXT_VENV)/.installed
# $(1): venv directory, $(2): MLflow release.
mlflow_venv = rm -rf $(1) && $(PYTHON) -m venv $(1) && \
	$(1)/bin/pip install --quiet --disable-pip-version-check -r $(MLFLOW_DEPS) mlflow-skinny==$(2) && \
	$(1)/bin/pip install --quiet --disable-pip-version-check --no-deps mlflow==$(2)

$(NEXT_STAMP): $(MLFLOW_DEPS)
	$(call mlflow_venv,$(NEXT_VENV),$(MLFLOW_NEXT))
	touch $@

test: $(STAMP) $(NEXT_STAMP) system-packages $(IDP_STAMP) lint
	$(BIN)/pytest

# The first step when MLflow releases: `make verify-mlflow VERSION=3.19.0` installs it in a
# throwaway venv (same recipe as above), dumps its routes and prints every pair the route table
# lacks for it, every pair that disappeared and every field whose reading changed
# (tests/verify_mlflow.py says what is compared); WRITE=1 also writes its checked-in list
# tests/mlflow_routes/$(VERSION).txt. README: "A new MLflow release".
verify-mlflow: $(STAMP)
	@test -n "$(VERSION)" || { echo "usage: make verify-mlflow VERSION=x.y.z"; exit 2; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(call mlflow_venv,$$tmp/venv,$(VERSION)) && \
	  $(BIN)/python tests/verify_mlflow.py --python $$tmp/venv/bin/python $(if $(WRITE),--write-list)

# Regenerate the MLflow dependency set from the main venv's pins (after its MLflow moved).
mlflow-deps: $(STAMP)
	$(BIN)/python tests/mlflow_deps.py > $(MLFLOW_DEPS).new && mv $(MLFLOW_DEPS).new $(MLFLOW_DEPS)

# bench.ldap starts the tests' throwaway slapd, hence system-packages; bench.oidc the tests'
# OpenID Connect provider, hence $(IDP_STAMP). Each module prints its details and writes its
# figures to $(BENCH_RESULTS); bench.summary then prints them all in one table (a module that
# fails is named there, and make fails after the table). BENCH_QUICK=1 makes every run short
# (for developing the harness, not for figures).
BENCH_RESULTS ?= build/bench
BENCH_MODULES := authz proxy workers audit ldap oidc
bench: $(STAMP) system-packages $(IDP_STAMP)
	rm -rf $(BENCH_RESULTS) && mkdir -p $(BENCH_RESULTS)
	@failed=; for m in $(BENCH_MODULES); do \
	  echo "== bench.$$m"; \
	  BENCH_RESULTS=$(BENCH_RESULTS) $(BIN)/python -m bench.$$m || failed="$$failed bench.$$m"; \
	done; \
	$(BIN)/python -m bench.summary $(BENCH_RESULTS); \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) $(NEXT_VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info tests/idp/node_modules
