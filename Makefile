# The two commands of the README. Both set up what is missing first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test abi doctor image reliability

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

# The reliability scenarios at a larger scale than `make test` runs them, then
# docs/reliability.md from the figures they publish (about 15 minutes).
RELIABILITY_FIGURES := $(CURDIR)/.reliability.jsonl
reliability: setup
	rm -f $(RELIABILITY_FIGURES)
	INTERCEPTOR_RELIABILITY_OUT=$(RELIABILITY_FIGURES) INTERCEPTOR_KILL_RUNS=200 \
		$(PY) -m pytest -q -p no:cacheprovider \
		-k "hostile or random_points or storm or garbage or resizing or agent_restart or upgrades_it_in_place or damaged_state or policy_rule or uncaptured_gap" \
		tests/test_cni_spec.py tests/test_hostile.py tests/test_journal.py tests/test_kills.py \
		tests/test_storms.py tests/test_garbage.py tests/test_migrate.py tests/test_agent.py
	$(PY) scripts/reliability_report.py $(RELIABILITY_FIGURES) > docs/reliability.md
