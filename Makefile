# The front door. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= examples/cruzflow.toml
# `make run LISTEN=127.0.0.1:50052` serves on another address; empty: the config's [server] listen.
LISTEN ?=
# `make run HTTP_LISTEN=127.0.0.1:8081` serves HTTP there; empty: the config's [http] listen.
HTTP_LISTEN ?=
PROTO := proto/cruzflow/v1/workflows.proto
GEN := clients/python

.PHONY: run test lint proto proto-check bench bench-sleepers breaking install clean dist lock

# pyproject.toml declares ranges; constraints.txt pins the exact versions
# installed here (and so in CI). `make lock` refreshes it.
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt pip setuptools
	$(BIN)/python -m pip install -q -c constraints.txt -e clients/python -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

# The two wheels a user installs cruzflow from, without this Makefile:
# dist/cruzflow-VERSION-py3-none-any.whl (the server) and
# dist/cruzflow_client-VERSION-py3-none-any.whl (the client it depends on);
# then `pip install --find-links dist cruzflow`.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m pip wheel -q --no-deps --wheel-dir dist ./clients/python .

# Re-resolve constraints.txt: the newest versions pyproject.toml's ranges
# allow, installed into a scratch venv and frozen (less our own two packages).
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools && \
	"$$tmp/venv/bin/python" -m pip install -q ./clients/python ".[dev]" && \
	"$$tmp/venv/bin/python" -m pip check && \
	{ sed -n '/^#/p' constraints.txt; \
	  "$$tmp/venv/bin/python" -m pip freeze --all | grep -v -i -E '^cruzflow([-_]client)?( @|==)'; \
	} > "$$tmp/constraints.txt" && mv "$$tmp/constraints.txt" constraints.txt
	@echo "constraints.txt refreshed; 'make install' installs it"

run: $(STAMP)
	$(BIN)/cruzflow serve --config $(CONFIG)$(if $(LISTEN), --listen $(LISTEN))$(if $(HTTP_LISTEN), --http-listen $(HTTP_LISTEN))

# The suites that hold on any store run a second time on PostgreSQL (a
# database of their own per test, on a cluster the session starts).
POSTGRES_SUITES := tests/test_engine.py tests/test_lifecycle.py tests/test_grpc_api.py \
  tests/test_batch_retention.py tests/test_hostile.py tests/test_listing.py \
  tests/client/test_client.py tests/client/test_errors_and_retries.py tests/client/test_sync.py \
  tests/e2e/test_crash_recovery.py tests/e2e/test_lifecycle_restart.py tests/e2e/test_shutdown.py \
  tests/test_child_workflows.py tests/e2e/test_child_workflows_crash.py \
  tests/test_concurrency.py tests/e2e/test_concurrency_crash.py tests/test_rollback.py \
  tests/test_schedules.py tests/client/test_schedules_client.py tests/e2e/test_schedules_crash.py \
  tests/test_replay_check.py tests/test_repair.py tests/test_watch_many.py \
  tests/e2e/test_watch_many_crash.py

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
ifeq ($(strip $(PYTEST_ARGS)),)
	CRUZFLOW_TEST_STORE=postgres $(BIN)/python -m pytest -q $(POSTGRES_SUITES)
endif

lint: $(STAMP) proto-check ts-lint console-check
	$(BIN)/ruff check server clients/python/cruzflow/client tests bench examples
	$(BIN)/ruff format --check server clients/python/cruzflow/client tests bench examples
	$(BIN)/mypy server/cruzflow clients/python/cruzflow/client examples tests bench
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code

# Regenerate the checked-in stubs from proto/.
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) \
	  --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) --connectrpc_out=protobuf=google:$(GEN) $(PROTO)
	touch $(GEN)/cruzflow/v1/__init__.py $(GEN)/cruzflow/v1/py.typed

# Fails when the checked-in stubs differ from what proto/ generates.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
	  --connectrpc_out=protobuf=google:$$tmp $(PROTO) >/dev/null 2>&1 && \
	for f in workflows_pb2.py workflows_pb2.pyi workflows_pb2_grpc.py workflows_pb2_grpc.pyi workflows_connect.py; do \
	  cmp -s $$tmp/cruzflow/v1/$$f $(GEN)/cruzflow/v1/$$f || { echo "stale generated code: $(GEN)/cruzflow/v1/$$f; run 'make proto'"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp

bench: $(STAMP)
	$(BIN)/python -m bench.bench $(BENCH_ARGS)

# W1 and W2 of `make bench` interleaved with the best peer's (Restate, through
# ../shared/peers/run-restate.sh), at least 3 rounds; prints the ratios of the
# medians. E.g. COMPARE_ARGS="--store postgres --rounds 5".
.PHONY: compare
compare: $(STAMP)
	$(BIN)/python -m bench.compare $(COMPARE_ARGS)

# Server memory, store size and GetStatus latency with 100,000 instances asleep.
bench-sleepers: $(STAMP)
	$(BIN)/python -m bench.bench --sleepers 100000 $(BENCH_ARGS)

breaking: $(STAMP)
	$(BIN)/buf breaking --against '.git#branch=main'

clean:
	rm -rf $(VENV) examples/data .pytest_cache .mypy_cache .ruff_cache
	rm -rf clients/typescript/node_modules clients/typescript/dist clients/typescript/build \
	  examples/node-app/node_modules examples/node-app/dist

# The long soak: thousands of workflows while the server is SIGKILLed at random
# moments dozens of times; prints the figures. `make test` runs its short form.
SOAK_WORKFLOWS ?= 5000
SOAK_KILLS ?= 50
SOAK_SECONDS ?= 150
SOAK_WATCHERS ?= 50
SOAK_SEED ?= 6
.PHONY: soak
soak: $(STAMP)
	CRUZFLOW_SOAK_WORKFLOWS=$(SOAK_WORKFLOWS) CRUZFLOW_SOAK_KILLS=$(SOAK_KILLS) \
	CRUZFLOW_SOAK_SECONDS=$(SOAK_SECONDS) CRUZFLOW_SOAK_WATCHERS=$(SOAK_WATCHERS) \
	CRUZFLOW_SOAK_SEED=$(SOAK_SEED) \
	  $(BIN)/python -m pytest -q -s tests/e2e/test_soak.py

# The TypeScript client and its example: ts-install, ts-proto, ts-proto-check, ts-lint, ts-test.
include clients/typescript/ts.mk
# The web console's bundle: console, console-check, screenshots.
include console/console.mk
