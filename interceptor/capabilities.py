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


def plan(mode, report, refused=None):
    """{mode, outbound, inbound, bypass, sockmap, rules_backend, ingress, filter_hooks,
    refused}; ValueError when the requested mode cannot be had here. refused: {program:
    the kernel's reason} for the datapath's programs the verifier refused (build.py),
    each of which takes its capability to the next mechanism down: eBPF capture to
    REDIRECT rules, the XDP filter to tc, the tc filter to XDP or nftables, the bypass
    to off. None (doctor without BCC) judges by the probes alone."""
    from .programs import BYPASS as BYPASS_PROGS, CORE, FILTER_HOOKS, INBOUND, OUTBOUND, serving
    refused = dict(refused or {})
    ok = {c.name: c.ok for c in report.checks}

    def accepted(names):
        return not any(n in refused for n in names)

    base = all(ok.get(n) for n in _BASE) and accepted(serving(CORE))
    outbound_ebpf = base and all(ok.get(n) for n in _OUTBOUND) and accepted(serving(OUTBOUND))
    inbound_ebpf = base and ok.get("sk_lookup", False) and accepted(serving(INBOUND))
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
        missing = [f"{n} ({details.get(n, 'not probed')})" for n in REQUIRED_FOR_EBPF if not ok.get(n)]
        missing += [f"{n} (refused by the kernel: {refused[n]})"
                    for n in serving(CORE) + serving(OUTBOUND) + serving(INBOUND) if n in refused]
        if missing:
            raise ValueError("eBPF mode needs " + ", ".join(missing))
        directions = (EBPF, EBPF)
    elif mode in ("nftables", "iptables"):
        if not ok.get(mode):
            raise ValueError(f"{mode} is not usable here")
        # forced rules: the Istio-equivalent baseline, no BPF at all
        return {"mode": mode, "outbound": RULES, "inbound": RULES, "bypass": False,
                "sockmap": False, "rules_backend": mode,
                "ingress": "nftables" if ok.get("nftables") else None, "filter_hooks": [],
                "refused": {}}
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
    # what the kernel offers: the loader loads the bypass program wherever it can, so
    # `load --bypass` can switch it on later without a reload (sock_ops drives it, so it
    # needs a direction on eBPF)
    sockmap = base and EBPF in directions and ok.get("sockmap", False) and accepted(serving(BYPASS_PROGS))
    hooks = [hook for hook, names in FILTER_HOOKS.items() if accepted(names) and _hook_works(hook, ok)]
    if not all(ok.get(n) for n in _FILTER_BASE):
        hooks = []
    return {"mode": name, "outbound": directions[0], "inbound": directions[1],
            "bypass": sockmap, "sockmap": sockmap,
            "rules_backend": rules_backend if RULES in directions else None,
            "ingress": XDP if hooks else ("nftables" if ok.get("nftables") else None),
            "filter_hooks": hooks, "refused": refused}


# The BPF ingress filter needs pinned maps, a compiler and pods known by netns cookie;
# not sock_ops or cgroup2 (it runs where capture may be on rules, as on Linux 5.10).
_FILTER_BASE = ("bpffs", "netns_cookie", "bcc_compile")


def _hook_works(hook, ok):
    """tc (cls_bpf) is in every kernel the datapath runs on; XDP attaches natively or
    generically per interface at enroll."""
    return hook == "tc" or ok.get("xdp_native") or ok.get("xdp_generic")


def filter_hooks(p):
    """The hooks the plan's BPF ingress filter may use, in order of preference for a
    veth. (Plans recorded before this key existed had both.)"""
    if p.get("ingress") != XDP:
        return []
    return p.get("filter_hooks", ["tc", "xdp"])


def filter_text(p):
    """The plan's ingress filter in a word: its BPF hooks ("tc/xdp", "tc"), else
    "nftables", else "off" (status, load's log, selfcheck, the kernel matrix)."""
    hooks = filter_hooks(p)
    return "/".join(hooks) if hooks else (p.get("ingress") or "off")


def captures_with_bpf(p):
    """Does a direction or the bypass run on the cgroup/sock_ops programs?"""
    return EBPF in (p["outbound"], p["inbound"]) or p["bypass"]


def has_sockmap(p):
    """Can the bypass be switched on for this plan? (Plans recorded before this key
    existed came from loads that loaded the bypass program unconditionally.)"""
    return p.get("sockmap", True)


def uses_bpf(p):
    return captures_with_bpf(p) or p.get("ingress") == XDP


def fallbacks(p):
    """One line per program the kernel refused: which program, the verifier's reason,
    and what serves its capability instead (doctor, status, the agent, selfcheck)."""
    from .programs import BY_NAME, FILTER_HOOK_OF
    out = []
    for name, reason in sorted((p.get("refused") or {}).items()):
        serves = BY_NAME[name].serves if name in BY_NAME else "?"
        if name in FILTER_HOOK_OF:
            hooks = filter_hooks(p)
            instead = f"ingress filter on {' and '.join(hooks)}" if hooks else \
                f"ingress filter on {p.get('ingress') or 'nothing: pods are not filtered'}"
        elif serves == "bypass":
            instead = "no same-host bypass"
        elif serves in ("outbound", "inbound"):
            instead = f"{serves} capture on {p.get('rules_backend') or p[serves]} rules"
        else:
            instead = "capture on " + (p.get("rules_backend") or "rules")
        out.append(f"the kernel refused {name} ({reason}): {instead}")
    return out
