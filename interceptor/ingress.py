"""The per-pod ingress filter: protected proxy ports and the operator's policy, served
by the pod's own XDP program (interceptor/xdp.py) or, where the node has no XDP, by an
nftables ingress chain (interceptor/ingress_nft.py). Called by enroll, `interceptor
policy` and removal; the caller holds the node lock.

Policy changes are applied as a difference, additions before removals, so packets of a
flow that stays allowed are never judged by a half-written policy, and the program is
never re-attached.
"""
import ctypes

from . import abi, ingress_policy, netns, xdp
from .maps import Maps, cidr_key, port_key
from .problems import Kind, Problem

XDP, NFTABLES = "xdp", "nftables"
DEFAULT_EPHEMERAL_LOW = 32768


class IngressError(Exception):
    pass


def protected_ports(settings):
    """The proxy's capture port and admin port, plus the operator's."""
    return sorted({settings.outbound_port, abi.ADMIN_PORT, *settings.protected_ports})


def mechanism(plan, settings):
    if settings.ingress_filter == "off":
        return None
    return plan.get("ingress")


def ephemeral_low(netns_path):
    """Start of the pod's ip_local_port_range (a per-netns sysctl): UDP to ports below it
    opens a flow, above it is a reply to one of the pod's own."""
    try:
        with netns.entered(netns_path):
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def apply(plan, cookie, netns_path, settings, ifname=None):
    """Set up the filter for a pod (enroll, re-enroll); returns what the pod record keeps."""
    mech = mechanism(plan, settings)
    if mech is None:
        if not (settings.ingress_policy or settings.protected_ports):
            return {"mechanism": None}
        if settings.ingress_filter == "off":
            raise IngressError("an ingress policy or protected ports were given with the ingress filter off")
        raise IngressError("an ingress policy or protected ports were given, but this node has no "
                           "ingress filter (neither XDP nor nftables)")
    low = ephemeral_low(netns_path)
    interfaces = xdp.pod_interfaces(netns_path, ifname)
    rec = {"mechanism": mech, "ephemeral_low": low, "interfaces": [], "skipped": []}
    if ifname and not interfaces:
        rec["skipped"].append({"ifname": ifname, "ifindex": 0, "reason": "no such interface"})
    if mech == NFTABLES:
        from . import ingress_nft
        ingress_nft.apply(netns_path, [n for n, _, _ in interfaces], protected_ports(settings),
                          settings.ingress_policy, low)
        rec["interfaces"] = [{"ifname": n, "ifindex": i, "driver": d, "mode": NFTABLES}
                             for n, i, d in interfaces]
        return rec
    with Maps() as maps:
        write_entries(maps, cookie, settings, low)
    for name, index, driver in interfaces:
        try:
            mode = xdp.attach(cookie, netns_path, name, index, settings.ingress_filter,
                              settings.ingress_conflict, driver)
        except (xdp.XdpError, OSError) as exc:
            raise IngressError(str(exc)) from None
        if mode is None:
            rec["skipped"].append({"ifname": name, "ifindex": index,
                                   "reason": "another XDP program is attached"})
        else:
            rec["interfaces"].append({"ifname": name, "ifindex": index, "driver": driver, "mode": mode})
    return rec


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

    for key in maps.ingress_sources.keys():
        if key.netns_cookie == cookie and bytes(key) not in new_sources:
            maps.ingress_sources.delete(key)
    for key in maps.ingress_rules.keys():
        if key.netns_cookie == cookie and bytes(key) not in new_rules:
            maps.ingress_rules.delete(key)
    for key in maps.port_rules.keys():
        if key.netns_cookie == cookie and key.kind == abi.PortKind.PROTECTED and key.port not in ports:
            maps.port_rules.delete(key)


def remove_entries(maps, cookie):
    maps.xdp_pods.delete(ctypes.c_uint64(cookie))
    for m in (maps.ingress_sources, maps.ingress_rules):
        for key in m.keys():
            if key.netns_cookie == cookie:
                m.delete(key)
    for key in maps.port_rules.keys():
        if key.netns_cookie == cookie and key.kind == abi.PortKind.PROTECTED:
            maps.port_rules.delete(key)


def update_policy(rec, settings):
    """Apply a changed policy to an enrolled pod, live."""
    ing = rec.get("ingress") or {}
    mech = ing.get("mechanism")
    if mech is None:
        raise IngressError("this pod has no ingress filter")
    if mech == NFTABLES:
        from . import ingress_nft
        ingress_nft.apply(rec["netns"], [a["ifname"] for a in ing["interfaces"]],
                          protected_ports(settings), settings.ingress_policy, ing["ephemeral_low"])
        return
    with Maps() as maps:
        write_entries(maps, rec["cookie"], settings, ing["ephemeral_low"])


def remove_rules(rec):
    """The nftables chain, when the pod had one and its netns still exists (the XDP links
    and map entries go with the pod's other pins and entries)."""
    ing = rec.get("ingress") or {}
    if ing.get("mechanism") == NFTABLES:
        from . import ingress_nft, rules
        if not rules.netns_gone(rec.get("netns")):
            ingress_nft.remove(rec["netns"])


def verify(rec, netns_path):
    ing = rec.get("ingress") or {}
    mech = ing.get("mechanism")
    path = netns_path or rec.get("netns")
    if mech == XDP:
        return xdp.verify(rec["cookie"], path, ing.get("interfaces", []))
    if mech == NFTABLES:
        from . import ingress_nft, rules
        if path and not rules.netns_gone(path) and \
                not ingress_nft.present(path, [a["ifname"] for a in ing["interfaces"]]):
            return [Problem(Kind.INGRESS_FILTER_MISSING, "ingress filter (nftables) chain missing")]
    return []


def counters(rec):
    """Counters kept outside the stats map (the nftables fallback)."""
    ing = rec.get("ingress") or {}
    if ing.get("mechanism") != NFTABLES:
        return {}
    from . import ingress_nft, rules
    if rules.netns_gone(rec.get("netns")):
        return {}
    return ingress_nft.counters(rec["netns"])
