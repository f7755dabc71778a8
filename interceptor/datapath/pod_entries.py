"""Every per-pod entry userspace writes into the maps, and nothing else writes them: the
one owner of pods, pod_addrs, port_rules, cidr_rules, inbound_listeners, xdp_pods,
ingress_sources and ingress_rules, and of removing a pod's stats and redirected entries
(abi.MAPS names each map's writer; tests/test_layers.py keeps it so). port_rules holds
capture's ports and the filter's protected ones, told apart by kind: one writer keeps
either from touching the other's. The caller holds the node lock.

Changes are applied as a difference, new entries before stale ones are removed, so a
re-enroll or a policy change never leaves the pod without an exclusion or a rule it
keeps, and the hooks never see half of one.
"""
import ctypes
import ipaddress

from interceptor import abi
from interceptor.pod import ingress_policy
from interceptor.datapath.maps import addr16, cidr_key, port_key


def _addr_key(address):
    return abi.PodAddrKey(addr=addr16(ipaddress.ip_address(address)))


# --- capture (the cgroup hooks and sk_lookup read these) -------------------------------
def address_owner(maps, address, cookie):
    """The cookie of another enrolled pod that owns this address, else None."""
    owner = maps.pod_addrs.get(_addr_key(address))
    if owner is not None and owner.value != cookie and maps.pods.get(ctypes.c_uint64(owner.value)) is not None:
        return owner.value
    return None


class Interfaces:
    """What the pod's excluded and virtual interfaces are in its namespace, read at
    enroll (kernel/netns.interfaces_of): their ifindexes, and the pod's routes with
    whether each goes out through an excluded interface."""
    __slots__ = ("ifindexes", "routes")

    def __init__(self, ifindexes=(), routes=()):
        self.ifindexes = dict(ifindexes)        # name -> ifindex
        self.routes = list(routes)              # [(ip_network, output ifindex or None)]

    def excluded_routes(self, settings):
        """[(network, excluded?)] of every route, when an excluded interface is there."""
        excluded = {i for name, i in self.ifindexes.items() if name in settings.exclude_interfaces}
        if not excluded:
            return []
        return [(net, oif in excluded) for net, oif in self.routes]

    def never_steered(self, settings):
        """The ifindexes inbound is never steered from: excluded and virtual interfaces."""
        names = set(settings.exclude_interfaces) | set(settings.reroute_interfaces)
        return sorted(i for name, i in self.ifindexes.items() if name in names)


def write_capture(maps, cookie, settings, addresses, replacing, interfaces=None):
    """The pod's capture entries; its pods entry last, which switches the hooks on for
    its namespace (or swaps its configuration in one write). replacing: a re-enroll,
    whose entries the new settings no longer have go after."""
    interfaces = interfaces or Interfaces()
    ports = {bytes(k): k for k in _port_keys(cookie, settings, interfaces)}
    cidrs = {bytes(k): (k, v) for k, v in _cidr_entries(cookie, settings, interfaces)}
    owners = {bytes(k): k for k in _owner_keys(cookie, settings)}
    addrs = {bytes(k): k for k in map(_addr_key, addresses)}
    for key in ports.values():
        maps.port_rules.put(key, ctypes.c_uint8(1))
    for key, value in cidrs.values():
        maps.cidr_rules.put(key, ctypes.c_uint8(value))
    for key in owners.values():
        maps.owner_rules.put(key, ctypes.c_uint8(1))
    for key in addrs.values():
        maps.pod_addrs.put(key, ctypes.c_uint64(cookie))
    s = settings
    mark, mask = s.skip_mark or (0, 0)
    maps.pods.put(ctypes.c_uint64(cookie), abi.PodConfig(
        proxy_uid=s.proxy_uid[0], proxy_gid=s.proxy_gid[0], outbound_port=s.outbound_port,
        inbound_port=s.inbound_port, flags=s.flags(), skip_mark=mark, skip_mark_mask=mask))
    if replacing:
        _delete_capture_rules(maps, cookie, keep_ports=set(ports), keep_cidrs=set(cidrs),
                              keep_owners=set(owners))
        _delete_addresses(maps, cookie, keep=set(addrs))


def switch_off(maps, cookie):
    """The hooks stop acting on the pod's namespace (its pods entry goes first)."""
    maps.pods.delete(ctypes.c_uint64(cookie))


def remove_capture(maps, cookie):
    switch_off(maps, cookie)
    _delete_capture_rules(maps, cookie)
    _delete_addresses(maps, cookie)
    maps.inbound_listeners.delete_pod_keys(cookie)


def is_captured(maps, cookie):
    return maps.pods.get(ctypes.c_uint64(cookie)) is not None


def add_listener(maps, cookie, family, fd):
    """A socket of the pod's proxy that listened before enrollment (sock_ops adds the
    ones that listen later)."""
    maps.inbound_listeners.put(abi.ListenerKey(netns_cookie=cookie, family=family), ctypes.c_uint32(fd))


def _port_keys(cookie, s, interfaces):
    keys = [port_key(cookie, abi.PortKind.OUT_EXCLUDE, p) for p in s.exclude_outbound_ports]
    keys += [port_key(cookie, abi.PortKind.OUT_INCLUDE, p) for p in s.include_outbound_ports]
    if not s.steers_all_inbound:
        keys += [port_key(cookie, abi.PortKind.IN_INCLUDE, p) for p in s.include_inbound_ports]
    excluded_in = set(s.exclude_inbound_ports) | set(abi.ALWAYS_EXCLUDED_INBOUND_PORTS)
    keys += [port_key(cookie, abi.PortKind.IN_EXCLUDE, p) for p in sorted(excluded_in)]
    # an ifindex in a port's place: a pod's namespace numbers its few interfaces low
    keys += [port_key(cookie, abi.PortKind.IN_EXCLUDE_IFINDEX, i)
             for i in interfaces.never_steered(s) if i < 65536]
    return keys


def _cidr_entries(cookie, s, interfaces):
    """[(key, value)] of the pod's cidr_rules."""
    out = [(cidr_key(cookie, kind, net), 1)
           for kind, nets in ((abi.CidrKind.OUT_INCLUDE, s.include_outbound_cidrs),
                              (abi.CidrKind.OUT_EXCLUDE, s.exclude_outbound_cidrs))
           for net in nets]
    if s.redirect_dns and s.dns_servers:
        out += [(cidr_key(cookie, abi.CidrKind.DNS_SERVER, ipaddress.ip_network(a)), 1)
                for a in s.dns_servers]
    if s.flags() & abi.POD_F_HOST_LOOPBACK:
        out.append((cidr_key(cookie, abi.CidrKind.HOST_LOOPBACK, s.host_loopback_cidr), 1))
    out += [(cidr_key(cookie, abi.CidrKind.IFACE_ROUTE, net), abi.IFACE_EXCLUDED if excluded else abi.IFACE_KEPT)
            for net, excluded in interfaces.excluded_routes(s)]
    return out


def _owner_keys(cookie, s):
    return [abi.OwnerKey(netns_cookie=cookie, id=i, kind=kind) for kind, i in s.owner_entries()]


def _delete_capture_rules(maps, cookie, keep_ports=frozenset(), keep_cidrs=frozenset(),
                          keep_owners=frozenset()):
    for key in maps.port_rules.pod_keys(cookie):
        if key.kind != abi.PortKind.PROTECTED and bytes(key) not in keep_ports:
            maps.port_rules.delete(key)
    maps.cidr_rules.delete_pod_keys(cookie, keep_cidrs)
    maps.owner_rules.delete_pod_keys(cookie, keep_owners)


def _delete_addresses(maps, cookie, keep=frozenset()):
    for key, owner in list(maps.pod_addrs.items()):
        if owner.value == cookie and bytes(key) not in keep:
            maps.pod_addrs.delete(key)


# --- the ingress filter (the pod's XDP or tc program reads these) -----------------------
def write_filter(maps, cookie, settings, ephemeral_low):
    """Make the maps hold exactly this pod's filter: protected proxy ports and the
    operator's policy. New entries first, then the pod's config (the allow-only switch),
    then stale entries removed: packets of a flow that stays allowed are never judged by
    a half-written policy, and the program is never re-attached."""
    sources, rule_bits = ingress_policy.entries(settings.ingress_policy)
    new_sources = {}
    for (kind, net), set_id in sources.items():
        key = cidr_key(cookie, kind, net)
        new_sources[bytes(key)] = (key, set_id)
    new_rules = {}
    for (set_id, proto, port), bits in rule_bits.items():
        key = ingress_policy.rule_key(cookie, set_id, proto, port)
        new_rules[bytes(key)] = (key, bits)
    ports = set(settings.filter_protected_ports())

    for key, bits in new_rules.values():
        maps.ingress_rules.put(key, ctypes.c_uint8(bits))
    for key, set_id in new_sources.values():
        maps.ingress_sources.put(key, ctypes.c_uint32(set_id))
    for port in ports:
        maps.port_rules.put(port_key(cookie, abi.PortKind.PROTECTED, port), ctypes.c_uint8(1))
    flags = abi.XDP_F_ALLOW_ONLY if ingress_policy.allow_only(settings.ingress_policy) else 0
    maps.xdp_pods.put(ctypes.c_uint64(cookie), abi.XdpPodConfig(flags=flags, ephemeral_low=ephemeral_low))

    maps.ingress_sources.delete_pod_keys(cookie, keep=set(new_sources))
    maps.ingress_rules.delete_pod_keys(cookie, keep=set(new_rules))
    _delete_protected(maps, cookie, keep=ports)


def remove_filter(maps, cookie):
    maps.xdp_pods.delete(ctypes.c_uint64(cookie))
    maps.ingress_sources.delete_pod_keys(cookie)
    maps.ingress_rules.delete_pod_keys(cookie)
    _delete_protected(maps, cookie)


def _delete_protected(maps, cookie, keep=frozenset()):
    for key in maps.port_rules.pod_keys(cookie):
        if key.kind == abi.PortKind.PROTECTED and key.port not in keep:
            maps.port_rules.delete(key)


# --- what the datapath itself wrote for a pod -------------------------------------------
def forget(maps, cookie):
    """The entries the datapath made for a pod (its counters, its connections' original
    destinations): removed with the pod, after every piece is gone."""
    maps.stats.delete_pod_keys(cookie)
    for key in maps.redirected.pod_keys(cookie, in_value=True):
        maps.redirected.delete(key)
