"""The ingress filter's packet table, shared by the filter's tests on the wire
(test_ingress.py) and through BPF_PROG_TEST_RUN (test_xdp_verdicts.py): the pod's
policy, and each case's frame, whether it is delivered and which counter moves."""
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from interceptor import abi

NET = 78
PEER4, PEER6 = f"10.{NET}.0.2", f"fd{NET}::2"
OTHER4 = f"10.{NET}.0.99"                 # same /24 as the peer, not the peer
APP_PORT, DENIED_PORT, UDP_DENIED_PORT = 8080, 9000, 7000

POLICY = [
    f"deny from {PEER4}/32 tcp port {DENIED_PORT}",
    f"deny from {PEER6}/128 tcp port {DENIED_PORT}",
    f"deny from 10.{NET}.0.0/24 udp port {UDP_DENIED_PORT}",
]


# --- the table ------------------------------------------------------------------------
# Each builder gets (wire, marker) and returns the frame's bytes. The marker is a unique
# payload wherever the case leaves room for one (truncated headers do not), so the
# pod-side socket recognises the exact frame.
def eth(w, type=None):
    e = Ether(src=w.src_mac, dst=w.dst_mac)
    if type is not None:
        e.type = type
    return e


def raw_ipv4(w, data):
    """An Ethernet frame of type IPv4 carrying exactly these bytes."""
    return bytes(eth(w, 0x0800) / Raw(data))


def raw_ipv6(w, data):
    return bytes(eth(w, 0x86DD) / Raw(data))


def tcp4(port, src=PEER4, flags="S", options=None, frag=0, mf=False):
    ip = IP(src=src, dst=TARGET4, flags="MF" if mf else 0, frag=frag)
    if options:
        ip.options = options
    return ip / TCP(sport=40000, dport=port, flags=flags)


def tcp6(port, src=PEER6, exts=()):
    pkt = IPv6(src=src, dst=TARGET6)
    for e in exts:
        pkt = pkt / e
    return pkt / TCP(sport=40000, dport=port, flags="S")


TARGET4, TARGET6 = f"10.{NET}.0.3", f"fd{NET}::3"


NOT_SEEN = "kernel drops it before the nftables chain"
# Under tc, like nftables, a frame whose VLAN tag is cut short never reaches the hook:
# the stack discards it while taking the tag off, before tc ingress runs.
TC_LABELS = {"VLAN tag cut short": NOT_SEEN}

CASES = [
    # description, builder, delivered, counter, counter under nftables (None: same;
    # NOT_SEEN: the kernel discards the frame before the chain, so no counter moves)
    ("v4 TCP to the app port", lambda w, m: bytes(eth(w) / tcp4(APP_PORT) / m), True, "ingress_passed", None),
    ("v4 TCP to a denied port from the denied source", lambda w, m: bytes(eth(w) / tcp4(DENIED_PORT) / m),
     False, "ingress_dropped_denied", None),
    ("v4 TCP to the denied port from another source of the same /24",
     lambda w, m: bytes(eth(w) / tcp4(DENIED_PORT, src=OTHER4) / m), True, "ingress_passed", None),
    ("v4 UDP to a port denied for the /24",
     lambda w, m: bytes(eth(w) / IP(src=OTHER4, dst=TARGET4) / UDP(dport=UDP_DENIED_PORT) / m),
     False, "ingress_dropped_denied", None),
    ("v4 TCP to the outbound capture port 15001", lambda w, m: bytes(eth(w) / tcp4(15001) / m),
     False, "ingress_dropped_protected_port", None),
    ("v4 UDP to the admin port 15000",
     lambda w, m: bytes(eth(w) / IP(src=PEER4, dst=TARGET4) / UDP(dport=15000) / m),
     False, "ingress_dropped_protected_port", None),
    ("v4 TCP with IP options to 15001",
     lambda w, m: bytes(eth(w) / tcp4(15001, options=[IPOption_NOP()] * 8) / m),
     False, "ingress_dropped_protected_port", None),
    ("v4 TCP with IP options to the app port",
     lambda w, m: bytes(eth(w) / tcp4(APP_PORT, options=[IPOption_NOP()] * 8) / m), True, "ingress_passed", None),
    ("v4 ICMP echo", lambda w, m: bytes(eth(w) / IP(src=PEER4, dst=TARGET4) / ICMP() / m),
     True, "ingress_passed", None),
    ("v6 TCP to a denied port from the denied source", lambda w, m: bytes(eth(w) / tcp6(DENIED_PORT) / m),
     False, "ingress_dropped_denied", None),
    ("v6 TCP behind hop-by-hop and destination options to a denied port",
     lambda w, m: bytes(eth(w) / tcp6(DENIED_PORT, exts=[IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()]) / m),
     False, "ingress_dropped_denied", None),
    ("v6 TCP behind destination options to 15001",
     lambda w, m: bytes(eth(w) / tcp6(15001, exts=[IPv6ExtHdrDestOpt()]) / m),
     False, "ingress_dropped_protected_port", None),
    ("v6 TCP behind extension headers to the app port",
     lambda w, m: bytes(eth(w) / tcp6(APP_PORT, exts=[IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()]) / m),
     True, "ingress_passed", None),
    ("802.1Q-tagged v4 TCP to 15001",
     lambda w, m: bytes(eth(w) / Dot1Q(vlan=10) / tcp4(15001) / m), False, "ingress_dropped_protected_port", None),
    ("802.1ad + 802.1Q (QinQ) v4 TCP to a denied port",
     lambda w, m: bytes(eth(w) / Dot1AD(vlan=20) / Dot1Q(vlan=10) / tcp4(DENIED_PORT) / m),
     False, "ingress_dropped_denied", "ingress_passed_non_ip"),
    ("v4 first fragment (MF, offset 0) to 15001",
     lambda w, m: bytes(eth(w) / tcp4(15001, mf=True) / m), False, "ingress_dropped_protected_port", None),
    ("v4 later fragment (offset 800 bytes): no L4 header, passed to be judged with its first",
     lambda w, m: bytes(eth(w) / IP(src=PEER4, dst=TARGET4, proto=6, frag=100) / Raw(b"\0" * 24 + m)),
     True, "ingress_passed_fragment", None),
    ("v4 TCP fragment at offset 8 bytes (RFC 1858 flag overwrite)",
     lambda w, m: bytes(eth(w) / IP(src=PEER4, dst=TARGET4, proto=6, frag=1) / Raw(b"\0" * 24 + m)),
     False, "ingress_dropped_malformed", "ingress_passed_fragment"),
    ("v4 tiny first fragment: 8 bytes of TCP header (ports but no flags)",
     lambda w, m: raw_ipv4(w, bytes(IP(src=PEER4, dst=TARGET4, proto=6, flags="MF")
                                    / Raw(bytes(TCP(dport=APP_PORT))[:8]))),
     False, "ingress_dropped_malformed", "ingress_passed"),
    ("v6 first fragment to 15001",
     lambda w, m: bytes(eth(w) / tcp6(15001, exts=[IPv6ExtHdrFragment(m=1, offset=0)]) / m),
     False, "ingress_dropped_protected_port", None),
    ("v6 later fragment",
     lambda w, m: bytes(eth(w) / IPv6(src=PEER6, dst=TARGET6) / IPv6ExtHdrFragment(nh=6, offset=100)
                        / Raw(b"\0" * 24 + m)), True, "ingress_passed_fragment", None),
    ("ARP request", lambda w, m: bytes(eth(w) / ARP(pdst=TARGET4, psrc=PEER4) / m),
     True, "ingress_passed_non_ip", None),
    ("LLDP-typed frame", lambda w, m: bytes(eth(w, 0x88CC) / Raw(b"\0" * 20 + m)),
     True, "ingress_passed_non_ip", None),
    ("IPv4 header cut short (10 bytes)",
     lambda w, m: raw_ipv4(w, bytes(IP(src=PEER4, dst=TARGET4))[:10]),
     False, "ingress_dropped_malformed", "ingress_passed"),
    ("IPv4 header length below 20 bytes (ihl 4)",
     lambda w, m: raw_ipv4(w, b"\x44" + bytes(IP(src=PEER4, dst=TARGET4) / TCP(dport=APP_PORT) / m)[1:]),
     False, "ingress_dropped_malformed", "ingress_passed"),
    ("IPv4 options running past the end of the packet (ihl 15)",
     lambda w, m: raw_ipv4(w, b"\x4f" + bytes(IP(src=PEER4, dst=TARGET4, proto=6))[1:20] + b"\1" * 12),
     False, "ingress_dropped_malformed", "ingress_passed"),
    ("TCP header cut short (8 bytes)",
     lambda w, m: raw_ipv4(w, bytes(IP(src=PEER4, dst=TARGET4, proto=6) / Raw(bytes(TCP(dport=15001))[:8]))),
     False, "ingress_dropped_malformed", "ingress_dropped_protected_port"),
    ("v6 with more extension headers than are walked",
     lambda w, m: bytes(eth(w) / tcp6(APP_PORT, exts=[IPv6ExtHdrDestOpt()] * (abi.XDP_MAX_EXT_HEADERS + 1)) / m),
     False, "ingress_dropped_malformed", "ingress_passed"),
    ("v6 extension header cut short",
     lambda w, m: raw_ipv6(w, bytes(IPv6(src=PEER6, dst=TARGET6, nh=60, plen=1) / Raw(b"\x06"))),
     False, "ingress_dropped_malformed", "ingress_passed"),
    ("VLAN tag cut short", lambda w, m: bytes(eth(w))[:12] + b"\x81\x00\x00", False,
     "ingress_dropped_malformed", NOT_SEEN),
]
