"""The datapath pieces that serve a pod, behind one interface (base.py), one module each
(the piece's name with an underscore), built on the mechanisms beside them: tc.py and
xdp.py attach the filter's per-pod stub (its map entries are datapath/pod_entries.py),
ingress_nft.py the nftables filter.

  filter-xdp       the pod's filter stub on each interface (tc or XDP), its entries in xdp_pods,
                   ingress_sources, ingress_rules and port_rules (kind PROTECTED)
  filter-nftables  an nftables netdev ingress chain per interface (a node without XDP)
  capture-rules    REDIRECT rules (nftables or iptables) for what eBPF cannot capture,
                   and a pod's virtual interfaces (reroute_interfaces) in every mode
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
from interceptor.datapath.plan import Ingress
from interceptor.pieces.base import (ADDRESS, CAPTURE, FILTER, Piece, PieceError, Target,
                                     filter_label)
from interceptor.pieces.capture_bpf import SK_LOOKUP_LINK, CaptureBpf
from interceptor.pieces.capture_rules import CaptureRules
from interceptor.pieces.filter_nftables import FilterNftables
from interceptor.pieces.filter_xdp import FilterXdp
from interceptor.pieces.inbound_source import InboundSource

__all__ = ["ADDRESS", "CAPTURE", "FILTER", "Piece", "PieceError", "Target", "filter_label",
           "SK_LOOKUP_LINK", "CaptureBpf", "CaptureRules", "FilterNftables", "FilterXdp",
           "InboundSource", "PIECES", "BY_NAME", "for_plan", "for_pod", "sweep_journal", "filter_of"]

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
    if settings.reroute_interfaces and CaptureRules.name not in names:
        # a VM's forwarded traffic: rules in the pod whatever the mode, before capture-bpf
        at = names.index(CaptureBpf.name) if CaptureBpf.name in names else len(names)
        names.insert(at, CaptureRules.name)
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
