# The lab image (included by the Makefile).
#   make image          build sipdrill:latest (cached: a few seconds when nothing changed)
#   make image-clean    remove the image, its debootstrap base and the wheelhouse
PYTHON ?= python3
SIPDRILL_IMAGE ?= sipdrill:latest
BASE_IMAGE ?= python:3.11-slim-bookworm
LOCAL_BASE_IMAGE ?= sipdrill-base:bookworm

.PHONY: image image-clean
# PYTHON (the Makefile's .venv) builds the wheelhouse: it must exist first.
image: | $(VENV)/bin/python
	PYTHON=$(PYTHON) IMAGE=$(SIPDRILL_IMAGE) BASE_IMAGE=$(BASE_IMAGE) LOCAL_BASE_IMAGE=$(LOCAL_BASE_IMAGE) \
		bash scripts/build-image.sh

image-clean:
	-docker image rm $(SIPDRILL_IMAGE) $(LOCAL_BASE_IMAGE) 2>/dev/null
	rm -rf wheelhouse
