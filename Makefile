# Every target creates .venv and installs what it needs; nothing but python3 is assumed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: all venv demo test lint typecheck unit bench clean docs-gen docs-check dist collection \
	ansible-sanity ansible-lint puppet-lint

all: test

$(STAMP): pyproject.toml
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

# Man page and bash/zsh completions, generated from sakeystate.cli:build_parser.
# Run after every CLI change; `make test` fails while they are stale.
docs-gen: $(STAMP)
	$(BIN)/python tools/cli_docs.py

docs-check: $(STAMP)
	$(BIN)/python tools/cli_docs.py --check

dist: $(STAMP)
	$(BIN)/python -m build --outdir dist .

collection: $(STAMP)
	$(BIN)/ansible-galaxy collection build --force --output-path dist \
		ansible/ansible_collections/sakeystate/sakeystate

# The ecosystem checks on their own (make test runs them too, as tests).
ansible-sanity: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest tests/test_ansible_sanity.py -k sanity_passes

ansible-lint: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest tests/test_ansible_sanity.py -k lint

puppet-lint:
	puppet parser validate $$(find puppet -name '*.pp')
	puppet-lint --fail-on-warnings puppet

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/propagation.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
