# hedgerl: the two commands of the README.
#   make up    set up .venv and start the platform on embedded defaults
#   make test  set up .venv and run every test (notebooks, tests/, tutorials)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# Debian's interpreter where there is one: workspaces run as each user's own account, and a venv made from an
# interpreter under /root (mode 700, as pyenv's is here) cannot be run by them.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
CHP    := configurable-http-proxy@5.3.0
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# a stamp that changes whenever the dependencies change
STAMP  := $(VENV)/.hedgerl-installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: install services up down lab test test-slow export readme bench help
.DEFAULT_GOAL := help

help:
	@echo "make up      set up and start the platform (hub, proxy, gateway, hedgerl service; Ctrl-C stops it)"
	@echo "make down    stop the platform that make up started (from another terminal)"
	@echo "make test    set up and run the tests (smoke sizes, minutes)"
	@echo "make test-slow  the heavy notebook cells and tests that make test leaves out (CI runs both)"
	@echo "make bench   run the performance benchmarks and write reports/bench/"
	@echo "make export  regenerate hedgerl/ from nbs/ and clean the notebooks"
	@echo "make readme  execute nbs/index.ipynb and render README.md from it (cells tagged remove-input show their output only)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from pip (the machine's pip configuration finds the CPU wheel); then uv for the rest. The editable
# install is a plain path entry (compat mode), not an import hook: a folder named hedgerl in a notebook's working
# directory (a workspace's ~/hedgerl) would otherwise shadow the package.
$(STAMP): | $(BIN)/python
	@start=$$(date +%s); \
	if [ "$(PYTHON)" = /usr/bin/python3 ] && ! grep -qx "home = /usr/bin" $(VENV)/pyvenv.cfg; then \
	  echo "hedgerl: rebuilding $(VENV) on /usr/bin/python3 (an interpreter every workspace account can run)"; \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	fi; \
	$(BIN)/python -m pip install -q --disable-pip-version-check uv 2>&1 | grep -v "is ignored" || true; \
	if ! $(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH)'.split('==')[1])" 2>/dev/null; then \
	  $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" numpy 2>&1 | grep -v "is ignored" || true; \
	  $(BIN)/python -c "import torch" ; \
	fi; \
	$(BIN)/uv pip install -q -p $(BIN)/python -C editable_mode=compat -e ".[dev]"; \
	test -x $(VENV)/node/node_modules/.bin/configurable-http-proxy || \
	  npm install --silent --no-audit --no-fund --prefix $(VENV)/node $(CHP) 2>&1 | grep -v EBADENGINE || true; \
	$(VENV)/node/node_modules/.bin/configurable-http-proxy --version >/dev/null; \
	$(BIN)/python -m ipykernel install --sys-prefix --name hedgerl --display-name hedgerl >/dev/null; \
	rm -f $(VENV)/.hedgerl-installed-*; touch $@; \
	echo "hedgerl: environment ready in $$(( $$(date +%s) - start )) s"

install: $(STAMP)

up: install
	$(BIN)/hedgerl hub up

down:
	$(BIN)/hedgerl hub down

lab: install
	$(BIN)/hedgerl up

export: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

readme: install
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace nbs/index.ipynb
	$(BIN)/nbdev-clean --fname nbs/index.ipynb
	$(BIN)/jupyter nbconvert --to markdown --stdout --TagRemovePreprocessor.remove_input_tags=remove-input \
	  nbs/index.ipynb > README.md

bench: install
	$(BIN)/hedgerl bench

# PostgreSQL for the registry tests: installed (Debian) and started when missing; in CI a missing server fails.
services:
	@bash .ci/services.sh

# the default loop is smoke-sized (minutes); heavy cells carry the `slow` flag and heavy tests the `slow` marker:
# `make test-slow` runs them (CI runs both). Each prints the time of every stage at the end.
test: install services
	@BIN=$(BIN) bash .ci/test.sh

test-slow: install services
	@BIN=$(BIN) bash .ci/test.sh slow
