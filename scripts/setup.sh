#!/usr/bin/env bash
# Everything interceptor needs on a fresh Debian 12 node, installed only when missing, so
# a second run takes about a second. Used by `make demo`, `make test`, CI and the Vagrant VMs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ] && [ "${1:-}" != --packages ]; then
    echo "setup: run as root (it installs packages and loads BPF programs)" >&2
    exit 1
fi

# python3-bpfcc: BCC bindings for Debian's /usr/bin/python3 (the PyPI "bcc" is unrelated).
# linux-headers-amd64: BCC needs a kernel build tree (see below).
# podman, containernetworking-plugins, runc, busybox-static: the real CNI runtime the
# plugin is tested with (podman's CNI backend, containers from a busybox rootfs).
# nftables, iptables: the fallback path (REDIRECT rules) where the kernel lacks BPF features.
# wrk, iperf3, netsniff-ng (trafgen): load generators of `interceptor bench`.
# containerd: the Kubernetes runtime the node agent is tested with (its CRI, driven as
# a kubelet would); gcc builds the tests' static pause image.
# mmdebstrap: the base of the agent's image, from Debian's packages (deploy/build-image.sh).
# dnsmasq-base, bind9-dnsutils: DNS capture's tests (a real DNS proxy and nameserver, dig).
# vagrant: only to validate vagrant/Vagrantfile in the tests (no VMs are started here).
# Debian names its current-headers package linux-headers-amd64; Ubuntu (the Vagrant
# node1) ships headers for the running kernel, and bpftool in linux-tools.
. /etc/os-release
if [ "${ID:-}" = ubuntu ]; then
    HEADERS=("linux-headers-$(uname -r)")
    BPFTOOL="linux-tools-$(uname -r)"
    VAGRANT=()          # a VM of the Vagrant set-up has no use for vagrant itself
else
    HEADERS=(linux-headers-amd64)
    BPFTOOL=bpftool
    VAGRANT=(vagrant)
fi
if [ -e /etc/interceptor-vm-image ]; then
    # the project's own guest image (vm/build-image.sh): VMs are made outside it, and it
    # carries every kernel's headers tree; Python packages come from its wheelhouse
    VAGRANT=()
    HEADERS=()
fi
PACKAGES=(python3-bpfcc python3-venv libbpf1 "$BPFTOOL" "${HEADERS[@]}" haproxy curl
          iproute2 procps podman containernetworking-plugins runc busybox-static
          nftables iptables wrk iperf3 netsniff-ng containerd gcc libc6-dev mmdebstrap
          dnsmasq-base bind9-dnsutils "${VAGRANT[@]}")

# `setup.sh --packages`: the list alone (the VM image installs the same set: vm/build-image.sh)
if [ "${1:-}" = --packages ]; then
    echo "${PACKAGES[@]}"
    exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# BCC compiles against /lib/modules/$(uname -r)/build. Nodes whose kernel has no Debian
# headers package borrow Debian's: the datapath includes UAPI headers only, which are
# stable across versions. `interceptor doctor` reports the borrowing.
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build/include" ]; then
    build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$build" ] || [ -z "$common" ]; then
        echo "setup: no kernel headers found under /usr/src" >&2
        exit 1
    fi
    mkdir -p "/lib/modules/$release"
    ln -sfn "$build" "/lib/modules/$release/build"
    ln -sfn "$common" "/lib/modules/$release/source"
    echo "setup: linked kernel headers $build for $release"
fi

# A venv on Debian's python3 that sees the Debian BCC bindings.
stamp=.venv/.installed
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
    touch "$stamp"
fi

# The CNI plugin's front (interceptor/cni/front.c), a static executable the plugin is installed with.
if [ ! -x interceptor/cni/front ] || [ interceptor/cni/front.c -nt interceptor/cni/front ]; then
    .venv/bin/python -m interceptor.cni.front
fi
