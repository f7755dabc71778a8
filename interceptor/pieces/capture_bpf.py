"""capture-bpf: the pod's entries in pods, pod_addrs, port_rules and cidr_rules (the
cgroup hooks act on its sockets from the moment its pods entry is written), its
sk_lookup link, and its proxy's listener if it listened before enrollment."""
import ctypes
import ipaddress
import os

from interceptor import abi, paths
from interceptor.kernel import libbpf, listeners
from interceptor.datapath.maps import addr16, cidr_key, port_key
from interceptor.datapath.plan import Mechanism
from interceptor.datapath.programs import BY_NAME as PROGRAMS, SK_LOOKUP_PROG
from interceptor.pod.problems import Kind, Problem
from interceptor.pieces.base import CAPTURE, Piece, PieceError

SK_LOOKUP_LINK = "sk_lookup"        # the pod's pin of its sk_lookup link


class CaptureBpf(Piece):
    name = "capture-bpf"
    role = CAPTURE
    uses_maps = True

    def check(self, target):
        maps, cookie = target.maps, target.record.cookie
        for a in target.record.addresses:
            owner = maps.pod_addrs.get(abi.PodAddrKey(addr=addr16(ipaddress.ip_address(a))))
            if owner is not None and owner.value != cookie and \
                    maps.pods.get(ctypes.c_uint64(owner.value)) is not None:
                raise PieceError(f"address {a} already belongs to enrolled netns cookie {owner.value}")

    def apply(self, target, previous):
        rec, maps, s = target.record, target.maps, target.record.settings
        cookie = rec.cookie
        ports = {bytes(k): k for k in _port_keys(cookie, s)}
        cidrs = {bytes(k): k for k in _cidr_keys(cookie, s)}
        addrs = {bytes(k): k for k in (abi.PodAddrKey(addr=addr16(ipaddress.ip_address(a))) for a in rec.addresses)}
        for key in ports.values():
            maps.port_rules.put(key, ctypes.c_uint8(1))
        for key in cidrs.values():
            maps.cidr_rules.put(key, ctypes.c_uint8(1))
        for key in addrs.values():
            maps.pod_addrs.put(key, ctypes.c_uint64(cookie))
        # switches the hooks on for the namespace (or swaps its config in one write)
        maps.pods.put(ctypes.c_uint64(cookie), abi.PodConfig(
            proxy_uid=s.proxy_uid, proxy_gid=s.proxy_gid, outbound_port=s.outbound_port,
            inbound_port=s.inbound_port, flags=s.flags()))
        if previous is not None:
            # a re-enroll: what the old settings had and the new have not goes last, so
            # the pod is never without an exclusion it keeps
            _delete_capture_rules(maps, cookie, keep_ports=set(ports), keep_cidrs=set(cidrs))
            for key, owner in list(maps.pod_addrs.items()):
                if owner.value == cookie and bytes(key) not in addrs:
                    maps.pod_addrs.delete(key)
        sk_lookup = target.plan.inbound == Mechanism.EBPF
        if sk_lookup:
            _attach_sk_lookup(cookie, rec.netns)
            # a proxy that listened before enrollment was not seen by sock_ops
            listeners.register_existing(maps, cookie, rec.netns, s.inbound_port)
        return {"sk_lookup": sk_lookup}

    def remove(self, record, state, maps):
        cookie = record.cookie
        if maps is not None:
            maps.pods.delete(ctypes.c_uint64(cookie))     # hooks off first
        pin = paths.pod_link_pin(cookie, SK_LOOKUP_LINK)
        if os.path.lexists(pin):
            libbpf.detach_link_pin(pin)
        if maps is None:
            return
        _delete_capture_rules(maps, cookie)
        for key, owner in list(maps.pod_addrs.items()):
            if owner.value == cookie:
                maps.pod_addrs.delete(key)
        maps.inbound_listeners.delete_pod_keys(cookie)

    def verify(self, record, state, netns_path):
        from interceptor.datapath.maps import Maps
        cookie = record.cookie
        try:
            with Maps() as maps:
                if maps.pods.get(ctypes.c_uint64(cookie)) is None:
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


def _port_keys(cookie, s):
    keys = [port_key(cookie, abi.PortKind.OUT_EXCLUDE, p) for p in s.exclude_outbound_ports]
    keys += [port_key(cookie, abi.PortKind.OUT_INCLUDE, p) for p in s.include_outbound_ports]
    if not s.steers_all_inbound:
        keys += [port_key(cookie, abi.PortKind.IN_INCLUDE, p) for p in s.include_inbound_ports]
    excluded_in = set(s.exclude_inbound_ports) | set(abi.ALWAYS_EXCLUDED_INBOUND_PORTS)
    keys += [port_key(cookie, abi.PortKind.IN_EXCLUDE, p) for p in sorted(excluded_in)]
    return keys


def _cidr_keys(cookie, s):
    return [cidr_key(cookie, kind, net)
            for kind, nets in ((abi.CidrKind.OUT_INCLUDE, s.include_outbound_cidrs),
                               (abi.CidrKind.OUT_EXCLUDE, s.exclude_outbound_cidrs))
            for net in nets]


def _delete_capture_rules(maps, cookie, keep_ports=frozenset(), keep_cidrs=frozenset()):
    # PROTECTED port entries are the XDP filter's, not capture's
    for key in maps.port_rules.pod_keys(cookie):
        if key.kind != abi.PortKind.PROTECTED and bytes(key) not in keep_ports:
            maps.port_rules.delete(key)
    maps.cidr_rules.delete_pod_keys(cookie, keep_cidrs)


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
