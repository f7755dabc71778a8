"""capture-bpf: the pod's entries in pods, pod_addrs, port_rules, cidr_rules and
owner_rules (the
cgroup hooks act on its sockets from the moment its pods entry is written), its
sk_lookup link, and its proxy's listener if it listened before enrollment."""
import os

from interceptor import paths
from interceptor.kernel import libbpf, listeners, netns
from interceptor.pod.problems import Kind, Problem
from interceptor.datapath import pod_entries
from interceptor.datapath.attach import SK_LOOKUP_LINK
from interceptor.datapath.plan import Mechanism
from interceptor.datapath.programs import BY_NAME as PROGRAMS, SK_LOOKUP_PROG
from interceptor.pieces.base import CAPTURE, Piece, PieceError


class CaptureBpf(Piece):
    name = "capture-bpf"
    role = CAPTURE
    uses_maps = True

    def check(self, target):
        maps, cookie = target.maps, target.record.cookie
        for a in target.record.addresses:
            owner = pod_entries.address_owner(maps, a, cookie)
            if owner is not None:
                raise PieceError(f"address {a} already belongs to enrolled netns cookie {owner}")

    def apply(self, target, previous):
        rec, maps, s = target.record, target.maps, target.record.settings
        names = (*s.exclude_interfaces, *s.reroute_interfaces)
        interfaces = pod_entries.Interfaces(*netns.interfaces_of(rec.netns, names)) if names else None
        pod_entries.write_capture(maps, rec.cookie, s, rec.addresses, replacing=previous is not None,
                                  interfaces=interfaces)
        sk_lookup = target.plan.inbound == Mechanism.EBPF
        if sk_lookup:
            _attach_sk_lookup(rec.cookie, rec.netns)
            # a proxy that listened before enrollment was not seen by sock_ops
            listeners.each_listening(rec.netns, s.inbound_port,
                                     lambda family, fd: pod_entries.add_listener(maps, rec.cookie, family, fd))
        return {"sk_lookup": sk_lookup}

    def remove(self, record, state, maps):
        cookie = record.cookie
        if maps is not None:
            pod_entries.switch_off(maps, cookie)     # hooks off first
        pin = paths.pod_link_pin(cookie, SK_LOOKUP_LINK)
        if os.path.lexists(pin):
            libbpf.detach_link_pin(pin)
        if maps is not None:
            pod_entries.remove_capture(maps, cookie)

    def verify(self, record, state, netns_path):
        from interceptor.datapath.maps import Maps
        cookie = record.cookie
        try:
            with Maps() as maps:
                if not pod_entries.is_captured(maps, cookie):
                    return [Problem(Kind.POD_ENTRY_MISSING, "pods map entry missing")]
        except OSError:
            return [Problem(Kind.POD_ENTRY_MISSING, "pods map entry missing: the datapath is not loaded")]
        sk_lookup = (state or {}).get("sk_lookup", record.mode.get("inbound") == Mechanism.EBPF)
        if not sk_lookup:
            return []
        info = libbpf.pinned_info(paths.pod_link_pin(cookie, SK_LOOKUP_LINK), libbpf.LinkInfo)
        if info is None:
            return [Problem(Kind.INBOUND_LINK_MISSING, "inbound sk_lookup link missing")]
        if info.u0 & 0xffffffff == 0:     # bpf_link_info.netns.netns_ino: 0 once detached
            return [Problem(Kind.INBOUND_LINK_MISSING,
                            "inbound sk_lookup link detached (its namespace is gone)")]
        return []


def _attach_sk_lookup(cookie, netns_path):
    pin = paths.pod_link_pin(cookie, SK_LOOKUP_LINK)
    if os.path.exists(pin):
        return
    os.makedirs(paths.pod_pin_dir(cookie), exist_ok=True)
    prog_fd = libbpf.obj_get(paths.prog_pin(SK_LOOKUP_PROG))
    ns_fd = os.open(netns_path, os.O_RDONLY)
    try:
        link = libbpf.link_create(prog_fd, ns_fd, PROGRAMS[SK_LOOKUP_PROG].attach_type)
        try:
            libbpf.obj_pin(link, pin)
        finally:
            os.close(link)
    finally:
        os.close(ns_fd)
        os.close(prog_fd)
