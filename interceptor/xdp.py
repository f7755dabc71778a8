"""Per-pod XDP stubs: the template the loader saves, the copy enroll loads for each pod,
and attaching it to the pod's interfaces.

XDP programs cannot ask for their network namespace's cookie, and interface indexes
repeat across namespaces, so one shared program could not tell pods apart. Each pod gets
its own small stub (xdp_pod in bpf/xdp_ingress.c) that puts the pod's cookie in the
packet's metadata and tail-calls the filter the loader verified once. The loader saves
the stub's compiled instructions with a placeholder constant (and which pinned map each
map reference means); enroll patches in the pod's cookie and the map fds it opened from
the pins and loads the result: no compiler, and a verifier pass over some 25
instructions. The attachment is a bpf_link pinned in the pod's pin directory, so unload
and DEL detach it like the pod's other links.
"""
import errno
import os

from . import abi, libbpf, netns, paths, state
from .insns import PSEUDO_MAP_FD, imm64s, set_imm64
from .problems import Kind, Problem

PROG_NAME = "xdp_pod"
LINK_PREFIX = "xdp_"          # + ifindex (bpffs refuses dots, which ifnames may have)
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# Drivers whose "native" XDP works on an skb that already exists (the sender built it):
# it drops somewhat cheaper (~19% less CPU per packet here), but veth turns off TSO/GSO on
# its peer while a program is attached (bulk TCP into the pod fell from ~14 to ~4 Gbit/s),
# so auto picks generic there (BENCHMARKS.md, "Ingress filter").
SKB_BACKED_DRIVERS = ("veth",)



class XdpError(Exception):
    pass


class ForeignProgramError(XdpError):
    pass


# --- template (loader side) -------------------------------------------------------------
def save_template(insns, map_names_by_fd):
    """insns: the compiled program (BCC's dump_func, map references as the loader's fds).
    Records each map reference by name and where the cookie placeholder sits."""
    relocs, cookie_at = [], []
    for i, src, value in imm64s(insns):
        if src == PSEUDO_MAP_FD:
            if value not in map_names_by_fd:
                raise XdpError(f"instruction {i} refers to an unknown map fd {value}")
            relocs.append([i, map_names_by_fd[value]])
        elif src == 0 and value == abi.XDP_COOKIE_PLACEHOLDER:
            cookie_at.append(i)
    if not cookie_at:
        raise XdpError("the compiled XDP program does not contain the cookie placeholder")
    state.write_json(paths.XDP_TEMPLATE, {
        "insns": insns.hex(), "maps": relocs, "cookie_at": cookie_at})


def template_maps():
    """The maps the loaded pods' XDP programs refer to (each holds them itself)."""
    template = state.read_json(paths.XDP_TEMPLATE)
    return {name for _, name in template["maps"]} if template else set()


def _instance(template, cookie, map_fds):
    insns = bytearray(bytes.fromhex(template["insns"]))
    for i, name in template["maps"]:
        set_imm64(insns, i, map_fds[name])
    for i in template["cookie_at"]:
        set_imm64(insns, i, cookie)
    return bytes(insns)


def load_for_pod(cookie):
    """A loaded copy of the program for this pod; returns its fd."""
    template = state.read_json(paths.XDP_TEMPLATE)
    if template is None:
        raise XdpError("no XDP program template: the datapath was loaded without the ingress filter")
    map_fds = {}
    try:
        for _, name in template["maps"]:
            if name not in map_fds:
                map_fds[name] = libbpf.obj_get(paths.map_pin(name))
        insns = _instance(template, cookie, map_fds)
        return libbpf.prog_load(libbpf.ProgType.XDP, PROG_NAME, insns)
    finally:
        for fd in map_fds.values():
            os.close(fd)


# --- attaching (inside the pod's netns) -------------------------------------------------
def auto_modes(driver):
    """The XDP modes to try, in order, for mode "auto"."""
    if driver in SKB_BACKED_DRIVERS:
        return ["generic"]
    return ["native", "generic"]


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
    ifname, ifindex, driver = iface.name, iface.index, iface.driver
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
    prog_fd = load_for_pod(cookie)
    try:
        os.makedirs(paths.pod_pin_dir(cookie), exist_ok=True)
        modes = auto_modes(driver) if mode == "auto" else [mode]
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


def detach_all(cookie):
    """Every XDP link of the pod, found by pin name (so those of a crashed enroll, which
    recorded no interfaces, go too)."""
    pin_dir = paths.pod_pin_dir(cookie)
    for name in paths.listdir(pin_dir):
        if name.startswith(LINK_PREFIX):
            libbpf.detach_link_pin(os.path.join(pin_dir, name))
