# The web console (console/), included from the Makefile; run from the repo
# root. Its bundle, server/cruzflow/server/console/console.js, is checked in:
# the server runs without Node. Rebuild it after changing console/src.
#
#   make console          type-check console/src and rebuild the bundle
#   make console-check    fail when the checked-in bundle is not what the
#                         sources build (make lint runs it)
#   make screenshots      retake docs/images/console-*.png with the browser tests

CONSOLE_DIR := console
CONSOLE_STAMP := $(CONSOLE_DIR)/node_modules/.installed
CONSOLE_OUT := server/cruzflow/server/console

.PHONY: console console-check screenshots

# The console links the client's folder (file:), whose dist ts-build makes.
$(CONSOLE_STAMP): $(CONSOLE_DIR)/package.json $(CONSOLE_DIR)/package-lock.json $(TS_STAMP)
	cd $(CONSOLE_DIR) && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

console: $(CONSOLE_STAMP) ts-build
	$(CONSOLE_DIR)/node_modules/.bin/tsc -p $(CONSOLE_DIR)/tsconfig.json
	node $(CONSOLE_DIR)/build.mjs

console-check: $(CONSOLE_STAMP) ts-build
	$(CONSOLE_DIR)/node_modules/.bin/tsc -p $(CONSOLE_DIR)/tsconfig.json
	@tmp=$$(mktemp -d) && node $(CONSOLE_DIR)/build.mjs --out $$tmp && \
	if cmp -s $$tmp/console.js $(CONSOLE_OUT)/console.js; then rm -rf $$tmp; \
	else echo "stale bundle: $(CONSOLE_OUT)/console.js; run 'make console'"; rm -rf $$tmp; exit 1; fi

screenshots: $(STAMP)
	CRUZFLOW_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/browser
