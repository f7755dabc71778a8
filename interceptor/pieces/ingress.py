"""The per-pod ingress filter's map entries: protected proxy ports and the operator's
policy, read by the pod's XDP program (bpf/xdp_ingress.c; attaching it is
interceptor/xdp.py, the piece that does both is pieces.FilterXdp). The caller holds the
node lock.

Policy changes are applied as a difference, additions before removals, so packets of a
flow that stays allowed are never judged by a half-written policy, and the program is
never re-attached.
"""
import ctypes

from interceptor import abi
from interceptor.datapath.maps import cidr_key, port_key
from interceptor.pod import ingress_policy


def protected_ports(settings):
    """The proxy's capture port and admin port, plus the operator's."""
    return sorted({settings.outbound_port, abi.ADMIN_PORT, *settings.protected_ports})


def write_entries(maps, cookie, settings, low):
    """Make the maps hold exactly this pod's filter: new entries first, then the pod's
    config (allow-only switch), then stale entries removed."""
    sources, rule_bits = ingress_policy.entries(settings.ingress_policy)
    new_sources = {}
    for (kind, net), set_id in sources.items():
        key = cidr_key(cookie, kind, net)
        new_sources[bytes(key)] = (key, set_id)
    new_rules = {}
    for (set_id, proto, port), bits in rule_bits.items():
        key = ingress_policy.rule_key(cookie, set_id, proto, port)
        new_rules[bytes(key)] = (key, bits)
    ports = set(protected_ports(settings))

    for key, bits in new_rules.values():
        maps.ingress_rules.put(key, ctypes.c_uint8(bits))
    for key, set_id in new_sources.values():
        maps.ingress_sources.put(key, ctypes.c_uint32(set_id))
    for port in ports:
        maps.port_rules.put(port_key(cookie, abi.PortKind.PROTECTED, port), ctypes.c_uint8(1))
    flags = abi.XDP_F_ALLOW_ONLY if ingress_policy.allow_only(settings.ingress_policy) else 0
    maps.xdp_pods.put(ctypes.c_uint64(cookie), abi.XdpPodConfig(flags=flags, ephemeral_low=low))

    maps.ingress_sources.delete_pod_keys(cookie, keep=set(new_sources))
    maps.ingress_rules.delete_pod_keys(cookie, keep=set(new_rules))
    for key in maps.port_rules.pod_keys(cookie):
        if key.kind == abi.PortKind.PROTECTED and key.port not in ports:
            maps.port_rules.delete(key)


def remove_entries(maps, cookie):
    maps.xdp_pods.delete(ctypes.c_uint64(cookie))
    maps.ingress_sources.delete_pod_keys(cookie)
    maps.ingress_rules.delete_pod_keys(cookie)
    for key in maps.port_rules.pod_keys(cookie):
        if key.kind == abi.PortKind.PROTECTED:
            maps.port_rules.delete(key)
