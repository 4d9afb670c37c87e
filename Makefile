# MeterChain: `make demo` runs the reference day end to end, `make test` runs every test.
# Both start with `make setup`, which installs what is missing and is safe to repeat.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MP_RUNTIME := firmware/node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test demo lint typecheck-firmware bench clean system-deps

setup: $(VENV)/.installed $(MP_RUNTIME) system-deps

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(MP_RUNTIME): firmware/package.json firmware/package-lock.json
	cd firmware && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Mosquitto and PostgreSQL are real servers the tests start themselves; Chromium renders the
# HTML report in a test; promtool (Debian package prometheus) checks the alert rules.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium fonts-dejavu-core"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing via apt"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  $(SUDO) systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	  $(SUDO) systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true; \
	fi

lint: setup
	$(VENV)/bin/ruff check meterchain edge_agent aggregator hil bench tests firmware

typecheck-firmware: setup
	$(VENV)/bin/pyright -p firmware/pyrightconfig.json

test: setup typecheck-firmware
	$(VENV)/bin/ruff check meterchain edge_agent aggregator hil bench tests firmware
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/meterchain demo

clean:
	rm -rf $(VENV) firmware/node_modules .pytest_cache .hypothesis build
