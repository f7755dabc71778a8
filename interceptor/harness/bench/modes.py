"""Putting the node in one benchmark mode: what is loaded and which pods are enrolled.

direct         no proxies at all: the app talks to the server app (upper bound)
explicit       the app addresses its sidecar directly: proxies, no interception
iptables       Istio-equivalent REDIRECT rules (iptables, no BPF)
nftables       the same rules on nftables (no BPF)
ebpf           the eBPF datapath with the same-host bypass
ebpf-nobypass  the eBPF datapath without it
ebpf-bypass-outbound, ebpf-bypass-mesh, ebpf-bypass-inbound
               the bypass on one leg only (app -> sidecar, sidecar -> sidecar, sidecar ->
               app); not in the default set: `--modes` picks them
"""
import json
import os
import subprocess
import sys

from interceptor import abi
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.ops import enrollment, ensure, loader
from interceptor.harness.bench.topology import (APP_PORT, APP_PORTS, EXPLICIT_APP_PORT,
                                                EXPLICIT_OUT, EXPLICIT_OUT_IPERF, IPERF_PORT,
                                                NODE2_ENV)

MODES = ("direct", "explicit", "iptables", "nftables", "ebpf", "ebpf-nobypass")
LEG_MODES = tuple(f"ebpf-bypass-{leg}" for leg in abi.BYPASS_LEGS)
ALL_MODES = MODES + LEG_MODES
INTERCEPTED = ("iptables", "nftables", "ebpf", "ebpf-nobypass") + LEG_MODES

# mode -> (load --mode, node bypass, the pods' bypass setting); None: nothing loaded,
# nobody enrolled
_LOAD = {"direct": None, "explicit": None, "iptables": ("iptables", False, True),
         "nftables": ("nftables", False, True), "ebpf": ("ebpf", True, True),
         "ebpf-nobypass": ("ebpf", False, True),
         **{mode: ("ebpf", True, leg) for mode, leg in zip(LEG_MODES, abi.BYPASS_LEGS)}}


def apply(mode, topo, client_settings=None):
    """Switch the node(s) to mode, with the pods (re-)enrolled; client_settings: extra
    enroll settings for the client pod (the rules-scaling scenario's exclusion lists).
    topo.server_node, when set, is the server pod's own node (another datapath instance
    on this machine, or another machine): it is switched too."""
    want = _LOAD[mode]
    node = node_state.current() if node_state.is_loaded() else None
    if topo.server_node is not None:
        topo.server_node.apply(mode, want, topo)
    if want is None:
        if node is not None:
            loader.unload()
        return
    load_mode, bypass, legs = want
    if node is None or node.requested_mode != load_mode:
        loader.unload()
        ensure.load(mode=load_mode, bypass=bypass)
    else:
        ensure.load(mode=load_mode, bypass=bypass)      # only switches the bypass
    enrollment.enroll(topo.client.netns_path,
                      PodSettings(**dict(client_settings or {}, bypass=legs)), pod="bench/client")
    if topo.server_node is None:
        enrollment.enroll(topo.server.netns_path, PodSettings(bypass=legs), pod="bench/server")


def _node2(*args):
    env = dict(os.environ, **NODE2_ENV)
    subprocess.run([sys.executable, "-m", "interceptor.cli", *args], env=env, check=True,
                   capture_output=True, text=True)


class LocalNode2:
    """The x-node scenario's second node on this machine: a datapath instance of its own
    (other pins and state), driven through the CLI, since paths are fixed per process."""

    def apply(self, mode, want, topo):
        state_file = os.path.join(NODE2_ENV["INTERCEPTOR_RUN_DIR"], "node.json")
        current = None
        if os.path.exists(state_file):
            with open(state_file) as f:
                current = json.load(f).get("requested_mode")
        if want is None:
            if current:
                _node2("unload")
            return
        load_mode, bypass, legs = want
        if current != load_mode:
            _node2("unload")
        _node2("load", "--mode", load_mode, "--bypass" if bypass else "--no-bypass")
        _node2("enroll", "--netns", topo.server.netns_path, "--pod", "bench/server",
               "--bypass", "true" if legs is True else legs)

    def release(self, topo):
        if os.path.exists(os.path.join(NODE2_ENV["INTERCEPTOR_RUN_DIR"], "node.json")):
            _node2("unenroll", "--netns", topo.server.netns_path)


def release(topo):
    """Unenroll the topology's pods from whichever datapath holds them (before their
    namespaces go, so no record or map entry outlives them)."""
    if node_state.node_plan() is not None:
        enrollment.unenroll(netns_path=topo.client.netns_path)
        if topo.server_node is None:
            enrollment.unenroll(netns_path=topo.server.netns_path)
    if topo.server_node is not None:
        topo.server_node.release(topo)


def unload_node2():
    _node2("unload")


def app_port(mode, slot=0):
    """The app port a mode's runs use (see topology.APP_PORTS); slot separates further
    (the rules scenario's list sizes)."""
    port = APP_PORT + ALL_MODES.index(mode) + len(ALL_MODES) * slot
    if port >= APP_PORT + APP_PORTS:
        raise ValueError(f"no app port left for {mode} slot {slot}")
    return port


def http_target(mode, topo, slot=0):
    if mode == "explicit":
        # the sidecars' explicit path ends at EXPLICIT_APP_PORT, this mode's app port
        assert app_port(mode) == EXPLICIT_APP_PORT
        return f"http://127.0.0.1:{EXPLICIT_OUT}/"
    return f"http://{topo.server.ipv4}:{app_port(mode, slot)}/"


def iperf_target(mode, topo):
    if mode == "explicit":
        return "127.0.0.1", EXPLICIT_OUT_IPERF
    return topo.server.ipv4, IPERF_PORT
