"""Enroll a pod's network namespace into the loaded datapath, and remove it.

This path runs for every pod start (CNI ADD), so it never imports BCC or compiles: it
opens the pinned maps and programs through libbpf. Entries are written in an order that
keeps the datapath consistent and the pod safe at every instant: the ingress filter
first (the proxy's ports are shielded before the proxy is used), then capture rules and
addresses, the pods entry (which switches the hooks on for the namespace) last; removal
the other way round.
"""
import contextlib
import ctypes
import ipaddress
import os
import time

from . import abi, ingress, libbpf, listeners, netns, opstats, paths, state
from .capabilities import uses_bpf
from .maps import LayoutError, Maps, addr16, cidr_key, port_key
from .problems import Kind, Problem
from .programs import BY_NAME, SK_LOOKUP_PROG

SK_LOOKUP_LINK = "sk_lookup"


class EnrollError(Exception):
    pass


class NotLoadedError(EnrollError):
    pass


def enroll(netns_path, settings, pod=None, addresses=None, container_id=None, ifname=None):
    """Enroll (or re-enroll with new settings) the namespace at netns_path. Returns the
    pod record. addresses: the pod's IPs when the caller knows them (CNI prevResult);
    read from the namespace otherwise."""
    try:
        record = _enroll(netns_path, settings, pod, addresses, container_id, ifname)
    except BaseException:
        opstats.record("enroll", ok=False)
        raise
    opstats.record("enroll", ok=True)
    return record


def _enroll(netns_path, settings, pod, addresses, container_id, ifname):
    plan = state.node_plan()
    if plan is None:
        raise NotLoadedError("the datapath is not loaded (run `interceptor load`)")
    rule_directions = [d for d in ("outbound", "inbound") if plan[d] == "rules"]
    if rule_directions and settings.no_proxy == "passthrough":
        raise EnrollError(f"no_proxy passthrough needs eBPF capture, and {' and '.join(rule_directions)}"
                          f" runs on {plan['rules_backend']} rules here (REDIRECT always redirects)")
    try:
        cookie = netns.cookie_of(netns_path)
    except OSError as exc:
        raise EnrollError(f"cannot open network namespace {netns_path}: {exc.strerror}") from exc
    if cookie == netns.host_cookie():
        raise EnrollError("refusing to enroll the host network namespace")
    if addresses is None:
        addresses = netns.addresses_of(netns_path)
    addresses = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a))
    record = {
        "cookie": cookie, "netns": str(netns_path), "pod": pod,
        "container_id": container_id, "ifname": ifname,
        "addresses": [str(a) for a in addresses],
        "settings": settings.to_dict(), "enrolled_at": time.time(),
        "mode": {"outbound": plan["outbound"], "inbound": plan["inbound"]},
    }
    with state.node_lock(), \
            (_open_maps() if uses_bpf(plan) else contextlib.nullcontext()) as maps:
        # Maps opened (and layout-checked) under the lock, so an unload cannot unpin them
        # in between, and before anything is written: a datapath of another version is
        # refused with nothing to undo.
        # Cookies are never reused, so a namespace without a record has nothing of ours
        # in the maps: only a re-enroll (or one that crashed half-way, which recorded
        # itself first) needs the full sweep of old entries.
        seen_before = os.path.exists(paths.pod_state_file(cookie))
        if maps is not None:
            _check_address_owners(maps, cookie, addresses)
        state.write_json(paths.pod_state_file(cookie), dict(record, complete=False))
        try:
            # The ingress filter first: once capture is on, the proxy's ports are in use
            # and must already be shielded from outside the pod.
            mech = ingress.mechanism(plan, settings)
            record["ingress"] = {"mechanism": mech}
            if mech == ingress.NFTABLES:    # recorded first, so a failure is undone below
                state.write_json(paths.pod_state_file(cookie), dict(record, complete=False))
            record["ingress"] = ingress.apply(plan, cookie, netns_path, settings, ifname)
            if rule_directions:
                backend = _rules_backend(plan, netns_path)
                record["rules"] = {"backend": backend.name, "directions": rule_directions}
                # recorded before applying, so a failure half-way is undone below
                state.write_json(paths.pod_state_file(cookie), dict(record, complete=False))
                record["rules"]["created"] = backend.apply(netns_path, settings, rule_directions)
            if maps is not None:    # last: its pods entry switches the hooks on
                _enroll_bpf(maps, plan, cookie, netns_path, settings, addresses, seen_before)
        except ingress.IngressError as exc:
            remove_pod(cookie)
            raise EnrollError(str(exc)) from None
        except Exception:
            remove_pod(cookie)
            raise
        record["complete"] = True
        state.write_json(paths.pod_state_file(cookie), record)
    return record


def _rules_backend(plan, netns_path):
    from . import rules     # only where a direction runs on rules: it costs ~5 ms of imports
    if plan["rules_backend"] == "nftables":
        return rules.Nftables()
    return rules.Iptables(rules.detect_iptables_backend(netns_path))


def _enroll_bpf(maps, plan, cookie, netns_path, settings, addresses, seen_before):
    if seen_before:
        _remove_entries(maps, cookie, keep_pod=True)    # re-enroll replaces the old rules
    _write_map_rules(maps, cookie, settings)
    for a in addresses:
        maps.pod_addrs.put(abi.PodAddrKey(addr=addr16(a)), ctypes.c_uint64(cookie))
    maps.pods.put(ctypes.c_uint64(cookie), abi.PodConfig(
        proxy_uid=settings.proxy_uid, proxy_gid=settings.proxy_gid,
        outbound_port=settings.outbound_port, inbound_port=settings.inbound_port,
        flags=settings.flags()))
    if plan["inbound"] == "ebpf":
        _attach_sk_lookup(cookie, netns_path)
        # a proxy that listened before enrollment was not seen by sock_ops
        listeners.register_existing(maps, cookie, netns_path, settings.inbound_port)


def _open_maps():
    """Every map, each checked against the layout this code writes, before anything is
    written: a datapath of another version is reported, never half-written."""
    try:
        return Maps().open_all()
    except OSError as exc:
        raise NotLoadedError("the datapath is not loaded (run `interceptor load`)") from exc
    except LayoutError as exc:
        raise NotLoadedError(str(exc)) from None


def _check_address_owners(maps, cookie, addresses):
    for a in addresses:
        owner = maps.pod_addrs.get(abi.PodAddrKey(addr=addr16(a)))
        if owner is not None and owner.value != cookie and \
                maps.pods.get(ctypes.c_uint64(owner.value)) is not None:
            raise EnrollError(f"address {a} already belongs to enrolled netns cookie {owner.value}")


def _write_map_rules(maps, cookie, s):
    for port in s.exclude_outbound_ports:
        maps.port_rules.put(port_key(cookie, abi.PortKind.OUT_EXCLUDE, port), ctypes.c_uint8(1))
    for port in s.include_outbound_ports:
        maps.port_rules.put(port_key(cookie, abi.PortKind.OUT_INCLUDE, port), ctypes.c_uint8(1))
    if not s.steers_all_inbound:
        for port in s.include_inbound_ports:
            maps.port_rules.put(port_key(cookie, abi.PortKind.IN_INCLUDE, port), ctypes.c_uint8(1))
    excluded_in = set(s.exclude_inbound_ports) | set(abi.ALWAYS_EXCLUDED_INBOUND_PORTS)
    for port in sorted(excluded_in):
        maps.port_rules.put(port_key(cookie, abi.PortKind.IN_EXCLUDE, port), ctypes.c_uint8(1))
    for kind, cidrs in ((abi.CidrKind.OUT_INCLUDE, s.include_outbound_cidrs),
                        (abi.CidrKind.OUT_EXCLUDE, s.exclude_outbound_cidrs)):
        for net in cidrs:
            maps.cidr_rules.put(cidr_key(cookie, kind, net), ctypes.c_uint8(1))


def _attach_sk_lookup(cookie, netns_path):
    pin = paths.pod_link_pin(cookie, SK_LOOKUP_LINK)
    if os.path.exists(pin):
        return
    os.makedirs(paths.pod_pin_dir(cookie), exist_ok=True)
    prog_fd = libbpf.obj_get(paths.prog_pin(SK_LOOKUP_PROG))
    ns_fd = os.open(netns_path, os.O_RDONLY)
    try:
        link = libbpf.link_create(prog_fd, ns_fd, BY_NAME[SK_LOOKUP_PROG].attach_type)
        try:
            libbpf.obj_pin(link, pin)
        finally:
            os.close(link)
    finally:
        os.close(ns_fd)
        os.close(prog_fd)


def _remove_entries(maps, cookie, keep_pod=False):
    """Delete every map entry of this netns. Iterates the maps rather than trusting the
    record, so entries left by a crashed enroll go too."""
    if not keep_pod:
        maps.pods.delete(ctypes.c_uint64(cookie))
    for key in maps.port_rules.keys():
        # protected ports are the ingress filter's (ingress.write_entries / remove_entries):
        # kept through a re-enroll, so the proxy's ports are never exposed in between
        if key.netns_cookie == cookie and key.kind != abi.PortKind.PROTECTED:
            maps.port_rules.delete(key)
    for key in maps.cidr_rules.keys():
        if key.netns_cookie == cookie:
            maps.cidr_rules.delete(key)
    for key, owner in list(maps.pod_addrs.items()):
        if owner.value == cookie:
            maps.pod_addrs.delete(key)
    if not keep_pod:
        ingress.remove_entries(maps, cookie)
        for key in maps.stats.keys():
            if key.netns_cookie == cookie:
                maps.stats.delete(key)
        for key, orig in list(maps.redirected.items()):
            if orig.netns_cookie == cookie:
                maps.redirected.delete(key)


def remove_pod(cookie, unloading=False):
    """Everything of one netns: hooks off first (pods entry), then the sk_lookup link,
    map entries, rules, pins and record. Safe when parts are already gone; caller holds
    the lock. Maps of another version's layout (LayoutError) cannot be edited: a DEL is
    refused (the runtime retries once the upgrade is done), while unload, which unpins
    the maps themselves, goes on without their entries."""
    record = state.read_json(paths.pod_state_file(cookie)) or {}
    pin_dir = paths.pod_pin_dir(cookie)
    try:
        _remove_bpf(cookie, pin_dir)
    except LayoutError:
        if not unloading:
            raise
        _detach_pins(pin_dir)
    applied = record.get("rules")
    if applied and record.get("netns") and os.path.exists(record["netns"]):
        from . import rules
        rules.backend_named(applied["backend"]).remove(record["netns"], applied.get("created"))
    ingress.remove_rules(record)
    state.remove(paths.pod_state_file(cookie))


def _remove_bpf(cookie, pin_dir):
    try:
        maps = Maps()
        maps.pods   # noqa: B018
    except OSError:
        _detach_pins(pin_dir)
        return
    with maps:
        maps.pods.delete(ctypes.c_uint64(cookie))
        _detach_pins(pin_dir)
        _remove_entries(maps, cookie)


def _detach_pins(pin_dir):
    if not os.path.isdir(pin_dir):
        return
    for name in paths.listdir(pin_dir):
        libbpf.detach_link_pin(os.path.join(pin_dir, name))
    os.rmdir(pin_dir)


def matching_cookies(netns_path=None, cookie=None, pod=None):
    """Cookies of our enrollments matching any of netns path, cookie or pod name (a
    namespace that is gone still matches its recorded path)."""
    records = state.pod_records()
    cookies = set()
    if cookie is not None:
        cookies.add(int(cookie))
    if netns_path is not None:
        try:
            cookies.add(netns.cookie_of(netns_path))
        except OSError:
            pass    # namespace gone: match by the recorded path instead
        cookies |= {c for c, r in records.items() if r.get("netns") == str(netns_path)}
    if pod is not None:
        cookies |= {c for c, r in records.items() if r.get("pod") == pod}
    # only what is ours: a namespace that is not enrolled does not match
    return sorted(cookies & (set(records) | paths.pinned_pod_cookies()))


def unenroll(netns_path=None, cookie=None, pod=None):
    """Remove one pod, found by netns path, cookie or pod name. Returns the cookies
    removed (empty when nothing matched: unenroll is idempotent)."""
    with state.node_lock():
        cookies = matching_cookies(netns_path, cookie, pod)
        for c in cookies:
            remove_pod(c)
            opstats.record("unenroll", ok=True)
        return cookies


def _container_matches(rec, container_id, ifname):
    return rec.get("container_id") == container_id and (not ifname or rec.get("ifname") in (None, ifname))


def find_container(container_id, ifname=None):
    for rec in state.pod_records().values():
        if _container_matches(rec, container_id, ifname):
            return rec
    return None


def unenroll_container(container_id, ifname=None):
    """CNI DEL: everything recorded for this container. Idempotent, and works when the
    namespace is already gone (the record has the cookie)."""
    with state.node_lock():
        cookies = [c for c, rec in state.pod_records().items()
                   if _container_matches(rec, container_id, ifname)]
        for c in cookies:
            remove_pod(c)
            opstats.record("unenroll", ok=True)
        return cookies


def verify(rec, netns_path=None):
    """Problems with one enrollment (CNI CHECK, status), most fundamental first: CHECK
    answers with the first one's code."""
    problems = []
    cookie = rec["cookie"]
    if rec.get("complete") is not True:
        problems.append(Problem(Kind.INCOMPLETE, "enrollment incomplete (interrupted, or still "
                                "in progress): run ADD/enroll again, or DEL/unenroll"))
    if netns_path:
        try:
            if netns.cookie_of(netns_path) != cookie:
                problems.append(Problem(Kind.NETNS_MISMATCH,
                                        f"network namespace {netns_path} is not the enrolled one"))
        except OSError:
            problems.append(Problem(Kind.NETNS_MISMATCH,
                                    f"network namespace {netns_path} cannot be opened"))
    mode = rec.get("mode", {"outbound": "ebpf", "inbound": "ebpf"})
    if "ebpf" in mode.values():
        problems += _verify_bpf(cookie, mode)
    applied = rec.get("rules")
    if applied and rec.get("netns") and os.path.exists(rec["netns"]):
        from . import rules
        if not rules.backend_named(applied["backend"]).present(rec["netns"]):
            problems.append(Problem(Kind.RULES_MISSING, f"{applied['backend']} rules missing"))
    problems += ingress.verify(rec, netns_path)
    return problems


def _verify_bpf(cookie, mode):
    problems = []
    try:
        with Maps() as maps:
            if maps.pods.get(ctypes.c_uint64(cookie)) is None:
                problems.append(Problem(Kind.POD_ENTRY_MISSING, "pods map entry missing"))
    except OSError:
        return [Problem(Kind.POD_ENTRY_MISSING, "pods map entry missing: the datapath is not loaded")]
    if mode["inbound"] != "ebpf":
        return problems
    info = libbpf.pinned_info(paths.pod_link_pin(cookie, SK_LOOKUP_LINK), libbpf.LinkInfo)
    if info is None:
        return problems + [Problem(Kind.INBOUND_LINK_MISSING, "inbound sk_lookup link missing")]
    if info.u0 & 0xffffffff == 0:     # bpf_link_info.netns.netns_ino: 0 once detached
        problems.append(Problem(Kind.INBOUND_LINK_MISSING,
                                "inbound sk_lookup link detached (its namespace is gone)"))
    return problems


def garbage_collect(keep):
    """CNI GC: remove CNI enrollments whose (container ID, ifname) is not in keep, and
    kernel objects no record accounts for. Enrollments made by the CLI are kept."""
    removed = []
    with state.node_lock():
        records = state.pod_records()
        for cookie, rec in records.items():
            cid = rec.get("container_id")
            if cid and (cid, rec.get("ifname")) not in keep and (cid, None) not in keep:
                remove_pod(cookie)
                removed.append(cookie)
        orphans = set()
        orphans |= paths.pinned_pod_cookies()
        try:
            with Maps() as maps:
                orphans |= {k.value for k in maps.pods.keys()}
                orphans |= {k.value for k in maps.xdp_pods.keys()}
        except OSError:
            pass
        for cookie in orphans - set(records):
            remove_pod(cookie)
            removed.append(cookie)
    return removed
