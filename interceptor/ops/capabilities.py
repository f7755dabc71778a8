"""Which mechanism serves each capability on this node, from doctor's probes: the Plan.

Outbound capture needs the connect, getpeername and getsockopt hooks; inbound capture
needs sk_lookup; both need sock_ops, bpffs, cgroup2, netns cookies and a working BCC.
What eBPF cannot serve is served by REDIRECT rules in the pod's netns (nftables
preferred, iptables otherwise); a missing sockmap only means no bypass.
"""
from enum import StrEnum

from interceptor.datapath.plan import (HYBRID, REQUESTED_MODES, Hook, Ingress, Mechanism, Plan,
                                       RequestedMode, RulesBackend)


class Probe(StrEnum):
    """doctor's probes, by the name its report gives each (one place: a misspelt probe
    is an AttributeError, not a node that silently drops to rules)."""
    BPFFS = "bpffs"
    CGROUP2 = "cgroup2"
    CONNECT4 = "connect4"
    CONNECT6 = "connect6"
    GETPEERNAME = "getpeername"
    GETSOCKOPT = "getsockopt"
    SOCK_OPS = "sock_ops"
    SOCKMAP = "sockmap"
    SK_LOOKUP = "sk_lookup"
    NETNS_COOKIE = "netns_cookie"
    XDP_NATIVE = "xdp_native"
    XDP_GENERIC = "xdp_generic"
    BCC_COMPILE = "bcc_compile"
    NFTABLES = "nftables"
    IPTABLES = "iptables"


_BASE = (Probe.BPFFS, Probe.CGROUP2, Probe.SOCK_OPS, Probe.NETNS_COOKIE, Probe.BCC_COMPILE)
_OUTBOUND = (Probe.CONNECT4, Probe.CONNECT6, Probe.GETPEERNAME, Probe.GETSOCKOPT)
REQUIRED_FOR_EBPF = (*_BASE, *_OUTBOUND, Probe.SK_LOOKUP)
_RULES_PROBES = (Probe.NFTABLES, Probe.IPTABLES)
# The BPF ingress filter needs pinned maps, a compiler and pods known by netns cookie;
# not sock_ops or cgroup2 (it runs where capture may be on rules, as on Linux 5.10).
_FILTER_BASE = (Probe.BPFFS, Probe.NETNS_COOKIE, Probe.BCC_COMPILE)


def probes_for(mode):
    """The doctor probes a load in this mode needs (None: all). A forced rules mode loads
    no BPF, so it neither compiles nor attaches a probe program."""
    return _RULES_PROBES if mode in (RulesBackend.NFTABLES, RulesBackend.IPTABLES) else None


def ebpf_usable(ok):
    """{probe name: ok} -> can the whole datapath run on eBPF?"""
    return all(ok.get(n) for n in REQUIRED_FOR_EBPF)


def choose(mode, report, refused=None):
    """The Plan for a load asked for in `mode`; ValueError when that mode cannot be had
    here. refused: {program: the kernel's reason} for the datapath's programs the
    verifier refused (build.py), each of which takes its capability to the next mechanism
    down: eBPF capture to REDIRECT rules, the XDP filter to tc, the tc filter to XDP or
    nftables, the bypass to off. None (doctor without BCC) judges by the probes alone."""
    from interceptor.datapath.programs import FILTER_HOOKS, Serves, serving
    refused = dict(refused or {})
    ok = {c.name: c.ok for c in report.checks}

    def accepted(names):
        return not any(n in refused for n in names)

    base = all(ok.get(n) for n in _BASE) and accepted(serving(Serves.CORE))
    outbound_ebpf = base and all(ok.get(n) for n in _OUTBOUND) and accepted(serving(Serves.OUTBOUND))
    inbound_ebpf = base and ok.get(Probe.SK_LOOKUP, False) and accepted(serving(Serves.INBOUND))
    rules_backend = RulesBackend.NFTABLES if ok.get(Probe.NFTABLES) else \
        (RulesBackend.IPTABLES if ok.get(Probe.IPTABLES) else None)
    nft_filter = Ingress.NFTABLES if ok.get(Probe.NFTABLES) else None

    details = {c.name: c.detail for c in report.checks}
    if mode in (RequestedMode.AUTO, RequestedMode.EBPF) and not ok.get(Probe.BCC_COMPILE) and \
            all(ok.get(n) for n in REQUIRED_FOR_EBPF if n != Probe.BCC_COMPILE):
        # never settle quietly for REDIRECT rules on a kernel that has it all: a node
        # missing python3-bpfcc or headers is a broken install, not an old kernel
        raise ValueError(f"this kernel has every feature of the eBPF datapath, but BCC cannot "
                         f"compile here ({details.get(Probe.BCC_COMPILE, 'not probed')}): install "
                         "python3-bpfcc and the kernel headers (see `interceptor doctor`), or "
                         "ask for REDIRECT rules with --mode nftables or --mode iptables")
    if mode == RequestedMode.EBPF:
        missing = [f"{n} ({details.get(n, 'not probed')})" for n in REQUIRED_FOR_EBPF if not ok.get(n)]
        missing += [f"{n} (refused by the kernel: {refused[n]})"
                    for n in serving(Serves.CORE) + serving(Serves.OUTBOUND) + serving(Serves.INBOUND)
                    if n in refused]
        if missing:
            raise ValueError("eBPF mode needs " + ", ".join(missing))
        outbound = inbound = Mechanism.EBPF
    elif mode in (RulesBackend.NFTABLES, RulesBackend.IPTABLES):
        if not ok.get(mode):
            raise ValueError(f"{mode} is not usable here")
        # forced rules: the Istio-equivalent baseline, no BPF at all
        return Plan(mode=mode, outbound=Mechanism.RULES, inbound=Mechanism.RULES,
                    rules_backend=RulesBackend(mode), ingress=nft_filter)
    elif mode == RequestedMode.AUTO:
        outbound = Mechanism.EBPF if outbound_ebpf else Mechanism.RULES
        inbound = Mechanism.EBPF if inbound_ebpf else Mechanism.RULES
    else:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(REQUESTED_MODES)})")

    directions = (outbound, inbound)
    if Mechanism.RULES in directions and rules_backend is None:
        raise ValueError("neither eBPF nor nftables/iptables can capture " + " and ".join(
            d for d, m in zip(("outbound", "inbound"), directions) if m == Mechanism.RULES))
    if directions == (Mechanism.EBPF, Mechanism.EBPF):
        name = Mechanism.EBPF.value
    elif directions == (Mechanism.RULES, Mechanism.RULES):
        name = rules_backend.value
    else:
        name = HYBRID
    # what the kernel offers: the loader loads the bypass program wherever it can, so
    # `load --bypass` can switch it on later without a reload (sock_ops drives it, so it
    # needs a direction on eBPF)
    sockmap = bool(base and Mechanism.EBPF in directions and ok.get(Probe.SOCKMAP, False)
                   and accepted(serving(Serves.BYPASS)))
    hooks = [Hook(hook) for hook, names in FILTER_HOOKS.items() if accepted(names) and _hook_works(hook, ok)]
    if not all(ok.get(n) for n in _FILTER_BASE):
        hooks = []
    return Plan(mode=name, outbound=outbound, inbound=inbound, bypass=sockmap, sockmap=sockmap,
                rules_backend=rules_backend if Mechanism.RULES in directions else None,
                ingress=Ingress.BPF if hooks else nft_filter, filter_hooks=tuple(hooks), refused=refused)


def _hook_works(hook, ok):
    """tc (cls_bpf) is in every kernel the datapath runs on; XDP attaches natively or
    generically per interface at enroll."""
    return hook == Hook.TC or ok.get(Probe.XDP_NATIVE) or ok.get(Probe.XDP_GENERIC)
