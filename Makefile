# edgefleet: `make demo` runs the whole system on this machine, `make test` runs every test,
# `make dist` builds what devices install. They set up what they need first (a .venv, and
# Mosquitto, Chromium, qemu-user-static, mmdebstrap, PostgreSQL and Prometheus from Debian's
# packages when missing) and are safe to rerun.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgefleet-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := mosquitto chromium python3-venv qemu-user-static binfmt-support mmdebstrap postgresql prometheus

.PHONY: setup system-deps binfmt demo test test-fast bench chaos lint clean vendor dist

setup: system-deps binfmt $(STAMP)

# Debian packages: Mosquitto (the broker), Chromium (browser tests), venv support; qemu-user-static,
# binfmt-support and mmdebstrap for the emulated arm64 device tests (tests/test_arm64_device.py);
# PostgreSQL (the tests start their own cluster with initdb/pg_ctl; no system service is used);
# Prometheus (promtool checks deploy/prometheus/; the tests start their own server on a free port).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/qemu-aarch64-static ] || missing="$$missing qemu-user-static"; \
	command -v update-binfmts >/dev/null 2>&1 || missing="$$missing binfmt-support"; \
	command -v mmdebstrap >/dev/null 2>&1 || missing="$$missing mmdebstrap"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/promtool ] || missing="$$missing prometheus"; \
	$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Lets this machine run arm64 programs (the emulated device's root) through qemu-user-static.
binfmt:
	@[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { \
		mountpoint -q /proc/sys/fs/binfmt_misc || $(SUDO) mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
		$(SUDO) update-binfmts --enable qemu-aarch64; \
	} || echo "warning: no qemu-aarch64 binfmt handler; the arm64 device tests will fail and say why"

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/edgefleet demo

# Both cores: every fixture takes its own ports and directories (docs/testing.md).
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=25

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not browser"

bench: setup
	$(PY) bench/run_all.py

# A rollout on 200 simulated devices while the broker, the server and devices fail; prints the
# invariant table and fails unless every invariant holds (docs/simulation.md#chaos).
chaos: setup
	$(VENV)/bin/edgefleet sim chaos --seed 1 --devices 200 --duration 300

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

# The edgefleet wheel and one offline wheelhouse per device platform, with SHA256SUMS
# (dist/wheelhouse/cp311-aarch64, cp311-x86_64): docs/device.md#install-on-a-raspberry-pi.
dist: setup
	$(PY) -m edge_agent.release build --out dist

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info .demo test-artifacts

# The console's chart library, from the npm registry, served by the fleet server itself
# (factory LANs have no internet). The files are committed; this target refreshes them.
CHARTJS_VERSION := 4.6.1
MATRIX_VERSION := 3.1.0
vendor:
	d=$$(mktemp -d) && cd $$d && npm pack --silent chart.js@$(CHARTJS_VERSION) chartjs-chart-matrix@$(MATRIX_VERSION) && \
	for f in *.tgz; do mkdir $${f%.tgz} && tar xzf $$f -C $${f%.tgz}; done && \
	cp chart.js-$(CHARTJS_VERSION)/package/dist/chart.umd.min.js $(CURDIR)/fleet_server/console/static/vendor/ && \
	cp chartjs-chart-matrix-$(MATRIX_VERSION)/package/dist/chartjs-chart-matrix.min.js $(CURDIR)/fleet_server/console/static/vendor/ && \
	sed -i 's#//\# sourceMappingURL=.*##' $(CURDIR)/fleet_server/console/static/vendor/*.js && rm -rf $$d
