"""The ingress filter as XDP: attaching the pod's stub (stubs.py) to its interfaces.

The attachment is a bpf_link pinned in the pod's pin directory, so unload and DEL detach
it like the pod's other links. Each distinct XDP program attached or detached rebuilds
the kernel's XDP dispatcher and waits out an RCU grace period, which is one reason a
veth gets the tc hook (tc.py) by default.
"""
import errno
import os

from interceptor import paths
from interceptor.kernel import libbpf, netns
from interceptor.pod.problems import Kind, Problem
from interceptor.datapath import stubs
from interceptor.datapath.plan import Hook

PROG_NAME = "xdp_pod"
LINK_PREFIX = "xdp_"          # + ifindex (bpffs refuses dots, which ifnames may have)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# Drivers whose packets arrive as an skb the sender built. XDP there costs bulk traffic:
# native XDP on a veth turns off TSO/GSO on its peer (bulk TCP into the pod fell from ~14
# to ~4 Gbit/s), generic XDP gives every skb a linear copy with headroom; and each pod's
# own XDP program waits out a grace period to attach and detach. The tc hook works on
# the skb as it is, so auto picks tc there (BENCHMARKS.md, "Ingress filter").
SKB_BACKED_DRIVERS = ("veth",)


def hook_for(mode, driver, hooks=(Hook.TC, Hook.XDP)):
    """The Hook that serves an interface, for the pod's ingress_filter setting,
    among the hooks whose programs this kernel accepted (the plan's filter_hooks): a pod
    that asks for a refused one gets the other, which judges alike."""
    wanted = Hook.TC if mode == "tc" or (mode == "auto" and driver in SKB_BACKED_DRIVERS) else Hook.XDP
    if wanted in hooks or not hooks:
        return wanted
    return hooks[0]


class XdpError(Exception):
    pass


class ForeignProgramError(XdpError):
    pass


# --- attaching (inside the pod's netns) -------------------------------------------------
# The XDP modes to try, in order, for mode "auto" (which means XDP off skb-backed drivers).
AUTO_MODES = ("native", "generic")


def attached_prog_id(netns_path, ifindex):
    """The id of the XDP program attached to the interface (any mode), 0 if none."""
    with netns.entered(netns_path):
        return libbpf.xdp_query_id(ifindex)


def link_pin(cookie, ifindex):
    return paths.pod_link_pin(cookie, f"{LINK_PREFIX}{ifindex}")


def attach(cookie, netns_path, iface, mode="auto", on_conflict="refuse"):
    """Attach the pod's program to one interface (a netns.Interface, with the program
    id it had when looked at); returns the mode used ("native" or "generic"), or None
    when skipped because another program is there. Idempotent: an existing attachment
    of ours is kept."""
    ifname, ifindex = iface.name, iface.index
    if mode not in MODE_FLAGS:
        mode = "auto"       # "tc" asked on a node whose kernel refused the tc filter
    pin = link_pin(cookie, ifindex)
    current = iface.xdp_prog_id
    if os.path.exists(pin):
        info = link_info(pin)
        if info is not None and info.prog_id == current and current:
            attached_mode = _mode_of(netns_path, ifindex)
            if mode in ("auto", attached_mode):
                return attached_mode        # re-enroll: keep it
        libbpf.detach_link_pin(pin)          # stale, or another mode was asked for
        current = attached_prog_id(netns_path, ifindex)
    if current:
        name = libbpf.prog_name_by_id(current) or "?"
        msg = (f"{ifname} in {netns_path} already has XDP program {current} ({name}); "
               "refusing to replace it")
        if on_conflict == "skip":
            return None
        raise ForeignProgramError(msg + " (set the pod's ingress filter conflict policy to "
                                  "'skip' to enroll without the filter)")
    prog_fd = stubs.load_for_pod(stubs.XDP, cookie)
    try:
        os.makedirs(paths.pod_pin_dir(cookie), exist_ok=True)
        modes = AUTO_MODES if mode == "auto" else [mode]
        last = None
        for m in modes:
            try:
                with netns.entered(netns_path):
                    link = libbpf.link_create(prog_fd, ifindex, libbpf.AttachType.XDP,
                                              flags=MODE_FLAGS[m])
            except OSError as exc:
                last = exc
                if exc.errno in (errno.EBUSY, errno.EEXIST):
                    raise ForeignProgramError(f"{ifname} in {netns_path}: another XDP program "
                                              f"is attached ({exc.strerror})") from None
                continue
            try:
                libbpf.obj_pin(link, pin)
            finally:
                os.close(link)
            return m
        raise XdpError(f"cannot attach XDP to {ifname} in {netns_path} "
                       f"({' or '.join(modes)} mode): {last.strerror}")
    finally:
        os.close(prog_fd)


def _mode_of(netns_path, ifindex):
    with netns.entered(netns_path):
        mode = libbpf.xdp_query_mode(ifindex)
    return {1: "native", 2: "generic", 3: "offload"}.get(mode, "unknown")


def link_info(pin):
    return libbpf.pinned_info(pin, libbpf.LinkInfo)


def verify(cookie, netns_path, attachments):
    """Problems with the pod's XDP attachments."""
    def missing(message):
        return Problem(Kind.INGRESS_FILTER_MISSING, message)
    problems = []
    for a in attachments:
        pin = link_pin(cookie, a["ifindex"])
        info = link_info(pin)
        if info is None:
            problems.append(missing(f"ingress filter (XDP) link missing on {a['ifname']}"))
            continue
        if info.u0 & 0xFFFFFFFF == 0:     # bpf_link_info.xdp.ifindex: 0 once detached
            problems.append(missing(f"ingress filter (XDP) detached from {a['ifname']}"))
            continue
        if netns_path and os.path.exists(netns_path):
            try:
                current = attached_prog_id(netns_path, a["ifindex"])
            except OSError:
                current = 0
            if current != info.prog_id:
                problems.append(missing(f"ingress filter (XDP) not the program on {a['ifname']}"))
    return problems


def detach(cookie, ifindex):
    pin = link_pin(cookie, ifindex)
    if os.path.lexists(pin):
        libbpf.detach_link_pin(pin)


def detach_all(cookie):
    """Every XDP link of the pod, found by pin name (so those of a crashed enroll, which
    recorded no interfaces, go too)."""
    pin_dir = paths.pod_pin_dir(cookie)
    for name in paths.listdir(pin_dir):
        if name.startswith(LINK_PREFIX):
            libbpf.detach_link_pin(os.path.join(pin_dir, name))
