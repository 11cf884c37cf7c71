# sipdrill — see README.md. `make test` is what CI runs (through .ci/run).
# Everything runs in a virtual environment (.venv), made from BOOTSTRAP_PYTHON
# (Python >= 3.11): Debian's own Python refuses `pip install` outside one (PEP 668).
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1

SCENARIO ?= scenarios/registrar-failover.yaml

include mk/image.mk

.PHONY: help install drill test pytest lint fmt clean

help:
	@echo "make drill     install, then run a drill (SCENARIO=$(SCENARIO)) on the local runtime"
	@echo "make install   make .venv and install sipdrill and its test tools there (editable)"
	@echo "make test      lint, then the whole test suite (unit, loopback, interop, docker)"
	@echo "make lint      ruff and mypy"
	@echo "make image     build the lab image sipdrill:latest (debootstrap base when no registry)"
	@echo "make fmt       ruff format"

$(VENV)/bin/python:
	@$(BOOTSTRAP_PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sipdrill needs Python >= 3.11; this is " + sys.version.split()[0] + ": set BOOTSTRAP_PYTHON=python3.11")'
	$(BOOTSTRAP_PYTHON) -m venv $(VENV) || { echo "make: cannot create $(VENV): on Debian, apt-get install python3-venv" >&2; exit 1; }

# Installed again only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(VENV)/.installed

drill: install
	$(VENV)/bin/sipdrill drill run $(SCENARIO)

test: install lint pytest

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
# .venv/bin first on PATH: tests that run `sipdrill` by name find this one.
pytest:
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

lint:
	$(PYTHON) -m ruff check sipdrill tests $(wildcard bench)
	$(PYTHON) -m mypy

fmt:
	$(PYTHON) -m ruff format sipdrill tests

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache $(VENV)
