"""The datapath pieces that serve a pod, behind one interface.

  filter-xdp       the pod's filter stub on each interface (tc or XDP), its entries in xdp_pods,
                   ingress_sources, ingress_rules and port_rules (kind PROTECTED)
  filter-nftables  an nftables netdev ingress chain per interface (a node without XDP)
  capture-rules    REDIRECT rules (nftables or iptables) for what eBPF cannot capture
  capture-bpf      the pod's entries in pods, pod_addrs, port_rules, cidr_rules, its
                   sk_lookup link and its proxy's existing listener
  inbound-source   ::6/128 on the pod's lo, the source of the proxy's inbound hop to its
                   app over IPv6 (Envoy's upstream_bind_config on Istio's inbound
                   clusters), as istio-iptables adds it; every mode

The plan names the pieces once, at load (`for_plan`); a pod gets them in that order:
its inbound source first, then the filter (the proxy's ports are shielded before capture puts them in use),
capture-bpf last (its pods entry switches the hooks on). Removal runs in reverse.

Every piece answers the same calls:
  check(target)               refuse before anything is written (nothing to undo)
  apply(target, previous)     make the piece hold the pod's settings and return what it
                              records; previous is its state from an earlier enroll (a
                              re-enroll), so it changes in place, new entries before stale
  update(record, state, maps) a live settings change (the ingress policy)
  remove(record, state, maps) undo; state None means begun and never recorded (a run
                              killed half-way), so it sweeps whatever it could have made
  verify(record, state, netns_path) -> [Problem]
  counters(record, state)     {reason label: {"count", "bytes"}} kept outside the stats map
"""
import ctypes
import ipaddress
import os
import shutil

from interceptor import abi, paths
from interceptor.kernel import libbpf, listeners, netns
from interceptor.datapath import stubs
from interceptor.datapath.maps import addr16, cidr_key, port_key
from interceptor.datapath.plan import Ingress, Mechanism, RulesBackend
from interceptor.datapath.programs import BY_NAME as PROGRAMS, SK_LOOKUP_PROG
from interceptor.pod.problems import Kind, Problem
from interceptor.pieces import ingress, tc, xdp

FILTER, CAPTURE, ADDRESS = "filter", "capture", "address"
SK_LOOKUP_LINK = "sk_lookup"


class PieceError(Exception):
    """The pod cannot be served as asked (a message for the operator)."""


class Target:
    """What apply and check work from: the record being written, the one look into the
    pod's namespace (netns.PodNetns), the node's plan, the opened maps (None when no
    piece of the pod uses them), and note(piece, state) to journal what removal needs
    mid-apply. (Plain classes on this path: `dataclasses` costs ~14 ms of imports.)"""
    __slots__ = ("record", "view", "plan", "maps", "note")

    def __init__(self, record, view, plan, maps, note=None):
        self.record, self.view, self.plan, self.maps, self.note = record, view, plan, maps, note


class Piece:
    name = None
    role = None
    uses_maps = False           # needs the pinned maps open (under the node lock)

    def check(self, target):
        pass

    def apply(self, target, previous):
        raise NotImplementedError

    def update(self, record, state, maps):
        return state

    def remove(self, record, state, maps):
        raise NotImplementedError

    def verify(self, record, state, netns_path):
        return []

    def counters(self, record, state):
        return {}


# --- filters ---------------------------------------------------------------------------
class _Filter(Piece):
    role = FILTER
    mechanism = None

    @staticmethod
    def describe(state):
        """{interfaces: [{ifname, ifindex, driver, mode}], skipped: [{ifname, reason}]}."""
        state = state or {}
        return state.get("interfaces", []), state.get("skipped", [])


def filter_label(mechanism, attachment):
    """How status and the demo name one interface's filter: 'tc eth0', 'xdp
    eth0:native', 'nftables eth0'."""
    if attachment["mode"] == "tc":
        return f"tc {attachment['ifname']}"
    if mechanism == Ingress.BPF:
        return f"xdp {attachment['ifname']}:{attachment['mode']}"
    return f"{mechanism} {attachment['ifname']}"


class FilterXdp(_Filter):
    """The BPF ingress filter: the pod's stub on each interface, on the tc hook (the
    default on a veth) or XDP. (Named for XDP, its first hook: the name is in every pod
    record's journal.)"""
    name = "filter-xdp"
    mechanism = Ingress.BPF
    uses_maps = True

    def apply(self, target, previous):
        rec, view, maps = target.record, target.view, target.maps
        s = rec.settings
        ingress.write_entries(maps, rec.cookie, s, view.ephemeral_low)
        out = {"ephemeral_low": view.ephemeral_low, "interfaces": [], "skipped": []}
        if rec.ifname and not view.interfaces:
            out["skipped"].append({"ifname": rec.ifname, "ifindex": 0, "reason": "no such interface"})
        had_clsact = {a["ifindex"] for a in (previous or {}).get("interfaces", []) if a.get("clsact_ours")}
        for iface in view.interfaces:
            entry = {"ifname": iface.name, "ifindex": iface.index, "driver": iface.driver}
            try:
                if xdp.hook_for(s.ingress_filter, iface.driver, target.plan.bpf_filter_hooks) == "tc":
                    # journalled before a qdisc may be made: what is on so far, this
                    # interface (its clsact possibly ours), and what an earlier enroll put
                    # on the interfaces not yet reached
                    done_so_far = out["interfaces"] + [dict(entry, mode="tc", clsact_ours=True)]
                    reached = {a["ifindex"] for a in done_so_far}
                    journal = dict(out, interfaces=done_so_far + [
                        a for a in (previous or {}).get("interfaces", []) if a["ifindex"] not in reached])
                    done = tc.attach(rec.cookie, rec.netns, iface, s.ingress_conflict,
                                     lambda: target.note(self, journal))
                    if done is not None:
                        done["clsact_ours"] = done["clsact_ours"] or iface.index in had_clsact
                        mode = "tc"
                        entry.update(done)
                    else:
                        mode = None
                else:
                    mode = xdp.attach(rec.cookie, rec.netns, iface, s.ingress_filter, s.ingress_conflict)
            except (xdp.XdpError, tc.TcError, stubs.StubError, OSError) as exc:
                raise PieceError(str(exc)) from None
            if mode is None:
                out["skipped"].append({"ifname": iface.name, "ifindex": iface.index,
                                       "reason": "another program holds the filter's place"})
            else:
                out["interfaces"].append(dict(entry, mode=mode))
        self._off_the_other_hook(rec, previous, out)
        return out

    @staticmethod
    def _off_the_other_hook(rec, previous, out):
        """A re-enroll that moved an interface between tc and XDP: the old hook's filter
        comes off once the new one is on (no moment without a filter)."""
        now = {a["ifindex"]: a["mode"] for a in out["interfaces"]}
        for a in (previous or {}).get("interfaces", []):
            ifindex = a["ifindex"]
            if ifindex not in now or (a["mode"] == "tc") == (now[ifindex] == "tc"):
                continue
            if a["mode"] == "tc":
                tc.remove_from(rec.netns, [ifindex], {ifindex} if a.get("clsact_ours") else set())
            else:
                xdp.detach(rec.cookie, ifindex)

    def update(self, record, state, maps):
        ingress.write_entries(maps, record.cookie, record.settings, state["ephemeral_low"])
        return state

    def remove(self, record, state, maps):
        xdp.detach_all(record.cookie)
        if state is None:
            # begun and never recorded, or a damaged record: our filter is found by its
            # place and name on every interface (a clsact we might have made was always
            # journalled first, so none can be ours here)
            tc.remove_from(record.netns)
        else:
            on_tc = [a for a in state.get("interfaces", []) if a.get("mode") == "tc"]
            if on_tc:
                tc.remove_from(record.netns, [a["ifindex"] for a in on_tc],
                               {a["ifindex"] for a in on_tc if a.get("clsact_ours")})
        if maps is not None:
            ingress.remove_entries(maps, record.cookie)

    def verify(self, record, state, netns_path):
        if state is None:
            return []
        netns_path = netns_path or record.netns
        attachments = state.get("interfaces", [])
        problems = xdp.verify(record.cookie, netns_path, [a for a in attachments if a.get("mode") != "tc"])
        for a in attachments:
            if a.get("mode") == "tc":
                problems += [Problem(Kind.INGRESS_FILTER_MISSING, msg) for msg in tc.verify(netns_path, a)]
        return problems


class FilterNftables(_Filter):
    name = "filter-nftables"
    mechanism = Ingress.NFTABLES

    def apply(self, target, previous):
        from interceptor.pieces import ingress_nft
        rec, view = target.record, target.view
        names = [i.name for i in view.interfaces]
        ingress_nft.apply(rec.netns, names, ingress.protected_ports(rec.settings),
                          rec.settings.ingress_policy, view.ephemeral_low)
        skipped = [{"ifname": rec.ifname, "ifindex": 0, "reason": "no such interface"}] \
            if rec.ifname and not names else []
        return {"ephemeral_low": view.ephemeral_low, "skipped": skipped,
                "interfaces": [{"ifname": i.name, "ifindex": i.index, "driver": i.driver,
                                "mode": Ingress.NFTABLES} for i in view.interfaces]}

    def update(self, record, state, maps):
        from interceptor.pieces import ingress_nft
        ingress_nft.apply(record.netns, [a["ifname"] for a in state["interfaces"]],
                          ingress.protected_ports(record.settings),
                          record.settings.ingress_policy, state["ephemeral_low"])
        return state

    def remove(self, record, state, maps):
        if record.netns_exists():
            from interceptor.pieces import ingress_nft
            ingress_nft.remove(record.netns)

    def verify(self, record, state, netns_path):
        from interceptor.pieces import ingress_nft
        path = netns_path or record.netns
        if state is None or not path or not os.path.exists(path):
            return []
        if not ingress_nft.present(path, [a["ifname"] for a in state["interfaces"]]):
            return [Problem(Kind.INGRESS_FILTER_MISSING, "ingress filter (nftables) chain missing")]
        return []

    def counters(self, record, state):
        if not record.netns_exists():
            return {}
        from interceptor.pieces import ingress_nft
        return ingress_nft.counters(record.netns)


# --- capture ---------------------------------------------------------------------------
class CaptureRules(Piece):
    name = "capture-rules"
    role = CAPTURE

    def check(self, target):
        if target.record.settings.no_proxy == "passthrough":
            directions = target.plan.rule_directions()
            raise PieceError(f"no_proxy passthrough needs eBPF capture, and {' and '.join(directions)}"
                             f" runs on {target.plan.rules_backend} rules here (REDIRECT always "
                             "redirects)")

    def apply(self, target, previous):
        from interceptor.kernel import rules  # only where a direction runs on rules: ~5 ms of imports
        rec = target.record
        directions = target.plan.rule_directions()
        if previous:
            backend = rules.backend_named(previous["backend"])
        elif target.plan.rules_backend == RulesBackend.NFTABLES:
            backend = rules.Nftables()
        else:
            backend = rules.Iptables(rules.detect_iptables_backend(rec.netns))
        out = {"backend": backend.name, "directions": directions}
        # a re-enroll finds our nat tables already there: keep knowing we made them
        known = (previous or {}).get("created") or []
        if isinstance(backend, rules.Iptables):
            # iptables-nft creates nat tables and base chains as it goes: journal what was
            # there before, so a run killed half-way can still tell which ones were ours
            before = backend.nat_chains(rec.netns)
            target.note(self, dict(out, preexisting=sorted(map(list, before)), earlier=known))
            created = backend.apply(rec.netns, rec.settings, directions, before)
        else:
            created = backend.apply(rec.netns, rec.settings, directions) or []
        created = sorted({tuple(c) for c in known} | {tuple(c) for c in created})
        return dict(out, created=[list(c) for c in created])

    def remove(self, record, state, maps):
        if not record.netns_exists():
            return      # the rules went with the namespace
        from interceptor.kernel import rules
        if state:
            backend = rules.backend_named(state["backend"])
            created = state.get("created")
            if created is None and "preexisting" in state:    # killed mid-apply
                preexisting = {tuple(c) for c in state["preexisting"]}
                ours = (backend.nat_chains(record.netns) - preexisting) | \
                    {tuple(c) for c in state.get("earlier", [])}
                created = sorted(map(list, ours))
            backend.remove(record.netns, created)
            return
        # never recorded which backend: remove ours from every backend there is
        backends = ([rules.Nftables()] if shutil.which("nft") else []) + \
            [rules.Iptables(b) for b in rules.iptables_backends()]
        for backend in backends:
            try:
                backend.remove(record.netns)
            except (rules.RulesError, OSError):
                pass

    def verify(self, record, state, netns_path):
        if state is None or not record.netns_exists():
            return []
        from interceptor.kernel import rules
        if not rules.backend_named(state["backend"]).present(record.netns):
            return [Problem(Kind.RULES_MISSING, f"{state['backend']} rules missing")]
        return []

    def counters(self, record, state):
        if state is None or not record.netns_exists():
            return {}
        from interceptor.kernel import rules
        return rules.backend_named(state["backend"]).counters(record.netns)


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


# --- the proxy's inbound source address ------------------------------------------------
class InboundSource(Piece):
    """::6 on lo, so the proxy can bind its inbound hop's source (127.0.0.6 needs nothing:
    127/8 is on lo already). The capture of every mode leaves connections from it alone.
    The address carries our mark (netns.ADDRESS_PROTO) and the journal says whether this
    piece added it, so removal takes away only an address of ours, also in a sweep after
    the record was lost (where the kernel keeps the mark: 5.18+)."""
    name = "inbound-source"
    role = ADDRESS

    def apply(self, target, previous):
        address = abi.INBOUND_SOURCE_V6
        # journalled before the add: a run killed right after it still removes it
        outcome = netns.ensure_lo_address_v6(
            target.record.netns, address,
            before_adding=lambda: target.note(self, {"address": address, "added": True}))
        if outcome is None:         # IPv6 is off in the namespace: no IPv6 inbound hop either
            return {"address": address, "added": False, "ipv6": False}
        # "other" stays ours when an earlier enroll of this pod added it (kernels < 5.18
        # keep no mark)
        ours = outcome in ("added", "ours") or bool((previous or {}).get("added"))
        return {"address": address, "added": ours, "ipv6": True}

    def remove(self, record, state, maps):
        if not record.netns_exists():
            return      # gone with the namespace
        address = (state or {}).get("address", abi.INBOUND_SOURCE_V6)
        try:
            if (state or {}).get("added") or netns.lo_address_v6(record.netns, address) == "ours":
                netns.remove_lo_address_v6(record.netns, address)
        except OSError:
            pass

    def verify(self, record, state, netns_path):
        if not state or not state.get("added") or not record.netns_exists():
            return []
        try:
            if netns.lo_address_v6(record.netns, state["address"]) is not None:
                return []
        except OSError:
            return []
        return [Problem(Kind.INBOUND_SOURCE_MISSING,
                        f"{state['address']} missing from lo (the proxy's inbound source over IPv6)")]


# --- which pieces ----------------------------------------------------------------------
PIECES = (InboundSource(), FilterXdp(), FilterNftables(), CaptureRules(), CaptureBpf())  # canonical order
BY_NAME = {p.name: p for p in PIECES}


def for_plan(plan):
    """The names of the pieces a load with this plan serves pods with, in apply order."""
    names = [InboundSource.name]
    if plan.ingress == Ingress.BPF:
        names.append(FilterXdp.name)
    elif plan.ingress == Ingress.NFTABLES:
        names.append(FilterNftables.name)
    if plan.rule_directions():
        names.append(CaptureRules.name)
    # sock_ops acts on enrolled pods only: the bypass needs their pods entries too
    if plan.captures_with_bpf:
        names.append(CaptureBpf.name)
    return names


def for_pod(plan, settings):
    """The pieces (objects) of one pod with these settings, in apply order."""
    names = list(plan.pieces) or for_plan(plan)
    if InboundSource.name not in names:     # a node loaded before the piece existed
        names = [InboundSource.name, *names]
    chosen = [BY_NAME[n] for n in names
              if not (BY_NAME[n].role == FILTER and settings.ingress_filter == "off")]
    if not any(p.role == FILTER for p in chosen) and (settings.ingress_policy or settings.protected_ports):
        if settings.ingress_filter == "off":
            raise PieceError("an ingress policy or protected ports were given with the ingress filter off")
        raise PieceError("an ingress policy or protected ports were given, but this node has no "
                         "ingress filter (neither XDP nor nftables)")
    return chosen


def sweep_journal():
    """For a pod whose record is missing or unreadable: every piece, each to sweep."""
    return [p.name for p in PIECES]


def filter_of(record):
    """(piece, state) of the pod's ingress filter, or (None, None)."""
    for e in record.journal:
        piece = BY_NAME.get(e.piece)
        if piece is not None and piece.role == FILTER:
            return piece, e.state
    return None, None
