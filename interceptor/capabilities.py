"""Which mechanism serves each capability on this node, from doctor's probes.

Outbound capture needs the connect, getpeername and getsockopt hooks; inbound capture
needs sk_lookup; both need sock_ops, bpffs, cgroup2, netns cookies and a working BCC.
What eBPF cannot serve is served by REDIRECT rules in the pod's netns (nftables
preferred, iptables otherwise); a missing sockmap only means no bypass.
"""
MODES = ("auto", "ebpf", "nftables", "iptables")
EBPF, RULES, XDP = "ebpf", "rules", "xdp"

_BASE = ("bpffs", "cgroup2", "sock_ops", "netns_cookie", "bcc_compile")
_OUTBOUND = ("connect4", "connect6", "getpeername", "getsockopt")
REQUIRED_FOR_EBPF = (*_BASE, *_OUTBOUND, "sk_lookup")
_RULES_PROBES = ("nftables", "iptables")


def probes_for(mode):
    """The doctor probes a load in this mode needs (None: all). A forced rules mode loads
    no BPF, so it neither compiles nor attaches a probe program."""
    return _RULES_PROBES if mode in ("nftables", "iptables") else None


def ebpf_usable(ok):
    """{probe name: ok} -> can the whole datapath run on eBPF?"""
    return all(ok.get(n) for n in REQUIRED_FOR_EBPF)


def plan(mode, report):
    """{mode, outbound, inbound, bypass, rules_backend, ingress}; ValueError when the requested
    mode cannot be had here."""
    ok = {c.name: c.ok for c in report.checks}
    base = all(ok.get(n) for n in _BASE)
    outbound_ebpf = base and all(ok.get(n) for n in _OUTBOUND)
    inbound_ebpf = base and ok.get("sk_lookup", False)
    rules_backend = "nftables" if ok.get("nftables") else ("iptables" if ok.get("iptables") else None)

    details = {c.name: c.detail for c in report.checks}
    if mode in ("auto", "ebpf") and not ok.get("bcc_compile") and \
            all(ok.get(n) for n in REQUIRED_FOR_EBPF if n != "bcc_compile"):
        # never settle quietly for REDIRECT rules on a kernel that has it all: a node
        # missing python3-bpfcc or headers is a broken install, not an old kernel
        raise ValueError(f"this kernel has every feature of the eBPF datapath, but BCC cannot "
                         f"compile here ({details.get('bcc_compile', 'not probed')}): install "
                         "python3-bpfcc and the kernel headers (see `interceptor doctor`), or "
                         "ask for REDIRECT rules with --mode nftables or --mode iptables")
    if mode == "ebpf":
        if not ebpf_usable(ok):
            missing = [f"{n} ({details.get(n, 'not probed')})" for n in REQUIRED_FOR_EBPF if not ok.get(n)]
            raise ValueError("eBPF mode needs " + ", ".join(missing))
        directions = (EBPF, EBPF)
    elif mode in ("nftables", "iptables"):
        if not ok.get(mode):
            raise ValueError(f"{mode} is not usable here")
        # forced rules: the Istio-equivalent baseline, no BPF at all
        return {"mode": mode, "outbound": RULES, "inbound": RULES, "bypass": False,
                "sockmap": False, "rules_backend": mode,
                "ingress": "nftables" if ok.get("nftables") else None}
    elif mode == "auto":
        directions = (EBPF if outbound_ebpf else RULES, EBPF if inbound_ebpf else RULES)
    else:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")

    if RULES in directions and rules_backend is None:
        raise ValueError("neither eBPF nor nftables/iptables can capture "
                         + " and ".join(d for d, m in zip(("outbound", "inbound"), directions) if m == RULES))
    if directions == (EBPF, EBPF):
        name = "ebpf"
    elif directions == (RULES, RULES):
        name = rules_backend
    else:
        name = "hybrid"
    return {"mode": name, "outbound": directions[0], "inbound": directions[1],
            "bypass": base and ok.get("sockmap", False),
            # what the kernel offers: the loader loads the bypass program wherever it
            # can, so `load --bypass` can switch it on later without a reload
            "sockmap": base and ok.get("sockmap", False),
            "rules_backend": rules_backend if RULES in directions else None,
            "ingress": _ingress(ok, base)}


def _ingress(ok, base):
    """The per-pod ingress filter: XDP (native or generic is chosen per interface at
    enroll), else an nftables ingress chain, else none (pods are enrolled unfiltered)."""
    if base and (ok.get("xdp_native") or ok.get("xdp_generic")):
        return XDP
    return "nftables" if ok.get("nftables") else None


def has_sockmap(p):
    """Can the bypass be switched on for this plan? (Plans recorded before this key
    existed came from loads that loaded the bypass program unconditionally.)"""
    return p.get("sockmap", True)


def uses_bpf(p):
    return EBPF in (p["outbound"], p["inbound"]) or p["bypass"] or p.get("ingress") == XDP
