# sipdrill — see README.md. `make test` is what CI runs (through .ci/run).
# Everything runs in a virtual environment (.venv), made from BOOTSTRAP_PYTHON
# (Python >= 3.11): Debian's own Python refuses `pip install` outside one (PEP 668).
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (0: one process, as before). Most tests
# wait on timers and subprocess labs, not on the 2 cores: 4 workers are one for
# the docker tests, two for the slow local drills, one for the rest (tests/conftest.py).
PYTEST_WORKERS ?= 4
export PYTHONDONTWRITEBYTECODE := 1

SCENARIO ?= scenarios/registrar-failover.yaml

include mk/image.mk

.PHONY: help install drill compare-designs test pytest lint fmt clean

help:
	@echo "make drill     install, then run a drill (SCENARIO=$(SCENARIO)) on the local runtime"
	@echo "make install   make .venv and install sipdrill and its test tools there (editable)"
	@echo "make compare-designs  run the three resiliency designs one after another (local runtime, minutes) and compare them: reports/designs-<time>/designs.html"
	@echo "make test      lint, then the whole test suite (unit, loopback, interop, docker)"
	@echo "make lint      ruff and mypy"
	@echo "make image     build the lab image sipdrill:latest (debootstrap base when no registry)"
	@echo "make fmt       ruff format"

$(VENV)/bin/python:
	@$(BOOTSTRAP_PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sipdrill needs Python >= 3.11; this is " + sys.version.split()[0] + ": set BOOTSTRAP_PYTHON=python3.11")'
	$(BOOTSTRAP_PYTHON) -m venv $(VENV) || { echo "make: cannot create $(VENV): on Debian, apt-get install python3-venv" >&2; exit 1; }

# Installed again only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml ext/mmsg/sipdrill_mmsg.c | $(VENV)/bin/python
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'
	@# Optional C helper (recvmmsg/sendmmsg for the lab DNS): without a compiler
	@# the servers keep to recvfrom/sendto.
	$(PYTHON) -m pip install -q --disable-pip-version-check ./ext/mmsg \
	  || echo "make: ext/mmsg not built; UDP servers use recvfrom/sendto" >&2
	@touch $@

install: $(VENV)/.installed

drill: install
	$(VENV)/bin/sipdrill drill run $(SCENARIO)

# COMPARE_ARGS: e.g. --hold 60, --lync-timers, --loopback-network 127.81.0.0/16.
compare-designs: install
	$(VENV)/bin/sipdrill drill compare-designs $(COMPARE_ARGS)

test: install lint pytest

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
# .venv/bin first on PATH: tests that run `sipdrill` by name find this one.
pytest:
	@PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTHON) -m pytest \
	  $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

lint:
	$(PYTHON) -m ruff check sipdrill tests $(wildcard bench)
	$(PYTHON) -m mypy

fmt:
	$(PYTHON) -m ruff format sipdrill tests

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache $(VENV)
