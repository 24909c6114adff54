# asd — developer entry points. Run as root on Debian; every target installs what it needs.
#
#   make test         lint, unit + integration tiers with coverage, then the container tier
#   make demo         the whole life of a target in a private mount namespace, narrated
#   make reliability  every crash point and the long fault/load runs (reliability.mk)
#   make bench        the performance benchmark (bench.mk; measures, is not a test)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := rsync zstd tar util-linux acl attr strace e2fsprogs btrfs-progs psmisc
COVERAGE_MIN := 85

.PHONY: deps venv lint unit integration test test-core coverage demo reliability clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check asd tests
	$(VENV)/bin/ruff format --check asd tests
	$(VENV)/bin/mypy

# The unit and integration tiers, measured together (asd runs in subprocesses inside the
# test namespaces; coverage follows them through its subprocess patch).
test-core: deps venv
	rm -rf .coverage-data
	$(VENV)/bin/coverage run -m pytest tests/unit tests/integration tests/reliability -m "not container"
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report --fail-under=$(COVERAGE_MIN)

test: lint test-core
	$(MAKE) test-container

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: deps venv
	$(VENV)/bin/pytest -q tests/integration

reliability: reliability-full

demo: deps venv
	demo/demo.sh

clean:
	rm -rf $(VENV) .coverage-data out build dist *.egg-info

include packaging.mk reliability.mk bench.mk
