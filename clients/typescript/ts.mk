# The TypeScript client (clients/typescript) and its example app
# (examples/node-app), included from the Makefile; run from the repo root.
# npm installs exactly what the two package-lock.json files pin.
#
#   make ts-install     npm ci in both (skipped while the lockfiles are unchanged)
#   make ts-proto       regenerate clients/typescript/src/gen from proto/
#   make ts-proto-check fail when the checked-in generated code is stale
#   make ts-lint        ts-proto-check, then tsc --noEmit on the client (and its
#                       tests), on the example, and on README.md's ```ts blocks
#   make ts-test        ts-proto-check, build, then node --test against real servers
#                       (CRUZFLOW_BIN: the server command, default .venv/bin/cruzflow)

TS_DIR := clients/typescript
TS_APP := examples/node-app
TS_STAMP := $(TS_DIR)/node_modules/.installed
TS_APP_STAMP := $(TS_APP)/node_modules/.installed
TSC := $(TS_DIR)/node_modules/.bin/tsc
NPM ?= npm
CRUZFLOW_BIN ?= .venv/bin/cruzflow
TS_TEST_CONCURRENCY ?= 4

.PHONY: ts-install ts-proto ts-proto-check ts-lint ts-build ts-test

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	cd $(TS_DIR) && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

# The app links the client's folder (file:), so it is installed after it.
$(TS_APP_STAMP): $(TS_APP)/package.json $(TS_APP)/package-lock.json $(TS_STAMP)
	cd $(TS_APP) && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

ts-install: $(TS_STAMP) $(TS_APP_STAMP)

# buf (from the venv) runs the protoc-gen-es that package-lock.json pins.
ts-proto: $(STAMP) $(TS_STAMP)
	$(BIN)/buf generate --template $(TS_DIR)/buf.gen.yaml

ts-proto-check: $(STAMP) $(TS_STAMP)
	@tmp=$$(mktemp -d) && \
	$(BIN)/buf generate --template $(TS_DIR)/buf.gen.yaml -o $$tmp && \
	if diff -r $$tmp/$(TS_DIR)/src/gen $(TS_DIR)/src/gen >/dev/null; then rm -rf $$tmp; \
	else echo "stale generated code: $(TS_DIR)/src/gen; run 'make ts-proto'"; rm -rf $$tmp; exit 1; fi

# The example type-checks against the client's declarations (dist/*.d.ts),
# so the client is built first.
ts-build: ts-install
	rm -rf $(TS_DIR)/dist
	$(TSC) -p $(TS_DIR)/tsconfig.json

ts-lint: ts-proto-check ts-build
	$(TSC) -p $(TS_DIR)/tsconfig.test.json --noEmit
	$(TSC) -p $(TS_APP)/tsconfig.json --noEmit
	node $(TS_DIR)/scripts/check-readme.mjs

ts-test: $(STAMP) ts-proto-check ts-build
	rm -rf $(TS_DIR)/build $(TS_APP)/dist
	$(TSC) -p $(TS_DIR)/tsconfig.test.json
	$(TSC) -p $(TS_APP)/tsconfig.json
	CRUZFLOW_BIN="$(CRUZFLOW_BIN)" node --test --test-concurrency=$(TS_TEST_CONCURRENCY) --test-timeout=60000 $(TS_DIR)/build/test/*.test.js
