# The two commands of the README. Both set up what is missing first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test unit abi doctor image reliability vm-image vm-test vm-check vm-bench

setup:
	@bash scripts/setup.sh

# `make demo PROXY=envoy`: the same with Envoy sidecars as Istio configures them
PROXY ?= haproxy
demo: setup
	$(PY) -m interceptor.harness.demo --proxy $(PROXY)

test: setup
	$(PY) -m pytest -v -p no:cacheprovider tests

# The unit layer: what needs neither root nor the kernel (the plan, the pieces' choice,
# CNI request validation, renderers, parsing; seconds). Any user.
unit:
	$(PY) -m pytest -q -p no:cacheprovider -m "not kernel and not root" tests

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

# The guest image for the kernel matrix and the Vagrant box: Debian 12 with the set-up's
# packages, Debian's kernels 5.10, 6.1 and 6.12, and this project installed as a wheel
# (build/vm; cached, rebuilt when its inputs change; ~2.5 minutes from nothing).
vm-image: setup
	bash vm/build-image.sh

# The kernel matrix: doctor and selfcheck in each mode with each sidecar (HAProxy, and
# Envoy as Istio configures it) on each kernel, one table (build/vm-test/matrix.txt and
# .json). Under emulation about 20 minutes.
VM_KERNELS ?= 5.10,6.1,6.12
VM_MODES ?= auto,nftables,iptables
VM_PROXIES ?= haproxy,envoy
VM_HOST ?= --host          # and this machine's own kernel, as a column (no VM)
vm-test: vm-image
	$(PY) vm/matrix.py --kernels $(VM_KERNELS) --modes $(VM_MODES) --proxies $(VM_PROXIES) $(VM_HOST) --out build/vm-test

# CI's reduced matrix: the oldest kernel's core check with both sidecars, eBPF where it
# can, as chosen, and this machine's kernel beside it.
vm-check:
	$(MAKE) vm-test VM_KERNELS=5.10 VM_MODES=auto

# Two VMs by Vagrant (vagrant-libvirt; the box from vm-image) and the cross-node benchmark
# between them, iptables and eBPF interleaved; everything removed after (build/vm-bench).
# Under emulation about 30 minutes; not part of `make test` or CI.
vm-bench: setup
	bash vagrant/run-bench.sh
