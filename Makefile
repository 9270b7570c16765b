# Two commands for a fresh Debian-based machine (root, Python 3.11+):
#   make demo   set everything up and run the main job on the local testbed
#   make test   set everything up and run the test suite (.ci/run calls this)
# Both are safe to run again: setup only does what is missing.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlxnode-installed
# Debian packages the testbed and the Ansible roles need on this machine; chromium and its
# driver for the chat page's browser test (no browser is downloaded from elsewhere).
DEB_PACKAGES := openssh-server openssh-sftp-server openssh-client rsync iproute2 util-linux mount python3 python3-venv procps chromium chromium-driver
PYTEST_ARGS ?=
# Two workers: a single pytest process leaves a core idle while tests wait on subprocesses,
# SSH and timeouts; the multi-host tests stay together on one of them (tests/conftest.py).
PYTEST_WORKERS ?= 2

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then echo "make: run as root to install $$missing" >&2; exit 2; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	@touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

demo: setup
	$(PY) -m tests.support.demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	-$(PY) -m tests.support.testbed down
	rm -rf $(VENV) .demo logs
