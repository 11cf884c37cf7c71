# sipdrill — see README.md. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1

SCENARIO ?= scenarios/registrar-failover.yaml

include mk/image.mk

.PHONY: help install drill test pytest lint fmt clean

help:
	@echo "make drill     install, then run a drill (SCENARIO=$(SCENARIO)) on the local runtime"
	@echo "make install   install sipdrill and its test tools (editable)"
	@echo "make test      lint, then the whole test suite (unit, loopback, interop, docker)"
	@echo "make lint      ruff and mypy"
	@echo "make image     build the lab image sipdrill:latest (debootstrap base when no registry)"
	@echo "make fmt       ruff format"

install:
	$(PYTHON) -m pip install -q -e '.[test]'

drill: install
	sipdrill drill run $(SCENARIO)

test: lint pytest

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
pytest:
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

lint:
	$(PYTHON) -m ruff check sipdrill tests $(wildcard bench)
	$(PYTHON) -m mypy

fmt:
	$(PYTHON) -m ruff format sipdrill tests

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
