# The two commands of the README. Both set up what is missing first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test abi doctor image

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m interceptor.demo

test: setup
	$(PY) -m pytest -v -p no:cacheprovider tests

# Regenerate the C view of interceptor/abi.py (a test fails when it is stale).
abi:
	$(PY) -m interceptor.abi > bpf/lib/abi.h

doctor: setup
	.venv/bin/interceptor doctor

# The node agent's container image (deploy/Containerfile), built locally with podman.
image: setup
	deploy/build-image.sh
