"""The datapath's programs: C function, program type, attach point and scope."""
from enum import StrEnum

from interceptor.kernel.libbpf import AttachType, ProgType
from interceptor.datapath.plan import Mechanism


class Scope(StrEnum):
    """Where a program is attached, and so who attaches it."""
    CGROUP = "cgroup"        # attached once at the cgroup2 root, pinned link in links/
    SOCKHASH = "sockhash"    # attached to the bypass_socks map (sk_msg)
    NETNS = "netns"          # attached per enrolled pod netns by enroll, link in pods/<cookie>/
    POD_COPY = "pod-copy"    # not loaded by the loader: saved as a template, one copy per pod
    TAIL = "tail-call"       # loaded and pinned by the loader, reached by tail call (PROG_ARRAY)


class Serves(StrEnum):
    """Which capability of the plan a program serves."""
    OUTBOUND = "outbound"
    INBOUND = "inbound"
    BYPASS = "bypass"
    CORE = "core"            # every capture on eBPF, and the bypass
    INGRESS = "ingress"


# the short names the table below and the loader use
CGROUP, SOCKHASH, NETNS, POD_COPY, TAIL = Scope.CGROUP, Scope.SOCKHASH, Scope.NETNS, Scope.POD_COPY, Scope.TAIL
OUTBOUND, INBOUND, BYPASS, CORE, INGRESS = Serves.OUTBOUND, Serves.INBOUND, Serves.BYPASS, Serves.CORE, Serves.INGRESS


class Program:
    """One program of the datapath (a plain class: this module is on the CNI path)."""
    __slots__ = ("name", "prog_type", "attach_type", "scope", "serves")

    def __init__(self, name, prog_type, attach_type, scope, serves):
        self.name = name                  # C function name, also the pin name
        self.prog_type = prog_type
        self.attach_type = attach_type
        self.scope = scope
        self.serves = serves

    def loaded(self, plan):
        """Loaded and pinned by the loader for this Plan. Per-pod copies never are (the
        loader saves a template); the bypass program is wherever the kernel has sockmap,
        so `load --bypass` can switch the bypass on later without a reload."""
        if self.scope == Scope.POD_COPY:
            return False
        if self.serves == Serves.BYPASS:
            return plan.sockmap
        return self.needed(plan)

    def needed(self, plan):
        if self.serves == Serves.CORE:
            return plan.captures_with_bpf
        if self.serves == Serves.BYPASS:
            return plan.bypass
        if self.serves == Serves.INGRESS:
            return FILTER_HOOK_OF[self.name] in plan.bpf_filter_hooks
        return plan.mechanism(self.serves.value) == Mechanism.EBPF


PROGRAMS = (
    Program("connect4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_CONNECT, CGROUP, OUTBOUND),
    Program("connect6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_CONNECT, CGROUP, OUTBOUND),
    Program("getpeername4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_GETPEERNAME, CGROUP, OUTBOUND),
    Program("getpeername6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_GETPEERNAME, CGROUP, OUTBOUND),
    Program("getsockopt", ProgType.CGROUP_SOCKOPT, AttachType.CGROUP_GETSOCKOPT, CGROUP, OUTBOUND),
    # DNS over UDP: a query sent with an address, and the answers shown as the nameserver's
    Program("sendmsg4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_UDP4_SENDMSG, CGROUP, OUTBOUND),
    Program("sendmsg6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_UDP6_SENDMSG, CGROUP, OUTBOUND),
    Program("recvmsg4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_UDP4_RECVMSG, CGROUP, OUTBOUND),
    Program("recvmsg6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_UDP6_RECVMSG, CGROUP, OUTBOUND),
    # sock_ops serves all: outbound original destinations, inbound listeners, bypass
    Program("sockops", ProgType.SOCK_OPS, AttachType.CGROUP_SOCK_OPS, CGROUP, CORE),
    Program("msg_redirect", ProgType.SK_MSG, AttachType.SK_MSG_VERDICT, SOCKHASH, BYPASS),
    Program("steer_inbound", ProgType.SK_LOOKUP, AttachType.SK_LOOKUP, NETNS, INBOUND),
    # the ingress filter on each of its hooks, and the per-pod stubs that tail-call it
    # with the pod's cookie (tc filters are added over rtnetlink: no attach type)
    Program("xdp_ingress", ProgType.XDP, AttachType.XDP, TAIL, INGRESS),
    Program("xdp_pod", ProgType.XDP, AttachType.XDP, POD_COPY, INGRESS),
    Program("tc_ingress", ProgType.SCHED_CLS, 0, TAIL, INGRESS),
    Program("tc_pod", ProgType.SCHED_CLS, 0, POD_COPY, INGRESS),
)

BY_NAME = {p.name: p for p in PROGRAMS}
# The ingress filter's hooks and the programs each needs (its filter and the per-pod stub).
FILTER_HOOKS = {"tc": ("tc_ingress", "tc_pod"), "xdp": ("xdp_ingress", "xdp_pod")}
FILTER_HOOK_OF = {name: hook for hook, names in FILTER_HOOKS.items() for name in names}


def serving(capability):
    """The names of the programs that serve a capability (OUTBOUND, INBOUND, ...)."""
    return [p.name for p in PROGRAMS if p.serves == capability]
BYPASS_MAP = "bypass_socks"
SK_LOOKUP_PROG = "steer_inbound"
# The program array each tail-called program sits in (entry 0).
TAIL_MAPS = {"xdp_ingress": "xdp_main", "tc_ingress": "tc_main"}
