"""Putting the node in one benchmark mode: what is loaded and which pods are enrolled.

direct         no proxies at all: the app talks to the server app (upper bound)
explicit       the app addresses its sidecar directly: proxies, no interception
iptables       Istio-equivalent REDIRECT rules (iptables, no BPF)
nftables       the same rules on nftables (no BPF)
ebpf           the eBPF datapath with the same-host bypass
ebpf-nobypass  the eBPF datapath without it
"""
from .. import enrollment, loader
from .topology import APP_PORT, EXPLICIT_OUT, EXPLICIT_OUT_IPERF, IPERF_PORT

MODES = ("direct", "explicit", "iptables", "nftables", "ebpf", "ebpf-nobypass")
INTERCEPTED = ("iptables", "nftables", "ebpf", "ebpf-nobypass")

# mode -> (load --mode, bypass); None: nothing loaded, nobody enrolled
_LOAD = {"direct": None, "explicit": None, "iptables": ("iptables", False),
         "nftables": ("nftables", False), "ebpf": ("ebpf", True), "ebpf-nobypass": ("ebpf", False)}


def apply(mode, topo, client_settings=None):
    """Switch the node to mode, with the pods (re-)enrolled; client_settings: extra enroll
    settings for the client pod (the rules-scaling scenario's exclusion lists)."""
    want = _LOAD[mode]
    node = loader.node_state() if loader.is_loaded() else None
    if want is None:
        if node is not None:
            loader.unload()
        return
    load_mode, bypass = want
    if node is None or node.get("requested_mode") != load_mode:
        loader.unload()
        loader.load(mode=load_mode, bypass=bypass)
    else:
        loader.load(mode=load_mode, bypass=bypass)      # only switches the bypass
    enrollment.enroll(topo.client.netns_path, enrollment.PodSettings(**(client_settings or {})),
                      pod="bench/client")
    enrollment.enroll(topo.server.netns_path, enrollment.PodSettings(), pod="bench/server")


def http_target(mode, topo):
    if mode == "explicit":
        return f"http://127.0.0.1:{EXPLICIT_OUT}/"
    return f"http://{topo.server.ipv4}:{APP_PORT}/"


def iperf_target(mode, topo):
    if mode == "explicit":
        return "127.0.0.1", EXPLICIT_OUT_IPERF
    return topo.server.ipv4, IPERF_PORT
