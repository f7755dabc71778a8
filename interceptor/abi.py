"""The one definition of everything the BPF programs and userspace share.

Constants (default ports, flags, reason codes, map sizes) and the byte layout of every
map key and value live here and nowhere else. `bpf/lib/abi.h` is generated from this
module (`make abi`, or `python -m interceptor.abi > bpf/lib/abi.h`); a unit test fails
when the committed header is out of date. This module imports nothing heavy: the CNI
path and `enroll` use it without BCC.
"""
import ctypes

# --- Defaults (Istio's, so that existing mesh configs carry over) --------------------
PROXY_UID = 1337
PROXY_GID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
# Istio's sidecar ports that inbound steering must never capture (health/status, metrics).
ALWAYS_EXCLUDED_INBOUND_PORTS = (15020, 15021, 15090)
# The proxy's admin port: with the pod's outbound capture port, what the ingress filter
# drops from the network by default (a connection to 15001 from outside loops through
# the proxy; 15000 is Envoy's admin API).
ADMIN_PORT = 15000
# Istio's HBONE (mTLS tunnel) port: never steered inbound, and the proxy's own
# connections to it are never sent back to its inbound port (istio-iptables:
# `ISTIO_INBOUND --dport 15008 -j RETURN`, `! --dport 15008`).
HBONE_PORT = 15008
# The DNS proxy's port (istio-agent's), where captured DNS goes (UDP and TCP port 53).
DNS_PORT = 15053
DNS_SERVER_PORT = 53
# The source address of the proxy's inbound hop to its app (Envoy's upstream_bind_config
# on Istio's inbound clusters since 1.10): connections from it over lo are never
# redirected. 127.0.0.6 is on lo already (127/8); ::6 is added to the pod's lo at enroll,
# as istio-iptables does. Host-order integers for C; the strings for userspace.
INBOUND_SOURCE_V4 = "127.0.0.6"
INBOUND_SOURCE_V6 = "::6"
INBOUND_SOURCE_V4_INT = 0x7F000006
INBOUND_SOURCE_V6_LAST_WORD = 6          # ::6: three zero words, then 6

# --- Map capacities -------------------------------------------------------------------
MAX_PODS = 4096
MAX_POD_ADDRS = 16384
MAX_CIDRS = 65536
MAX_PORT_RULES = 65536
MAX_REDIRECTED_SOCKETS = 65536   # LRU: oldest entries go first when full
MAX_BYPASS_SOCKETS = 65536
MAX_LISTENERS = 2 * MAX_PODS     # one inbound listener per pod and family
MAX_STAT_KEYS = 65536
MAX_OWNER_RULES = 16384          # proxy uids/gids beyond the first, owner filters, all pods
MAX_INGRESS_SOURCES = 65536      # ingress policy source prefixes, all pods
MAX_INGRESS_RULES = 65536        # ingress policy {source set, proto, port} entries, all pods
MAX_XDP_PODS = MAX_PODS
XDP_MAX_VLAN_TAGS = 2            # 802.1Q / 802.1ad tags looked through
XDP_MAX_EXT_HEADERS = 6          # IPv6 extension headers walked; more = malformed
# Each pod gets its own instance of the XDP program with its netns cookie in place of
# this value (XDP has no netns-cookie helper, and ifindexes repeat across namespaces).
XDP_COOKIE_PLACEHOLDER = 0x1C0FFEE0DEADBEEF
# The capacities an operator may set at load time (`--map-size MAP=N`), by map: the
# header lets a -D flag override each default.

# --- Pod flags (pod_config.flags) -----------------------------------------------------
POD_F_PASSTHROUGH = 1 << 0        # proxy not listening: let the flow through (else reject)
POD_F_BYPASS = 1 << 1             # same-host socket pairs skip the TCP/IP stack, every leg
POD_F_OUT_PORTS_INCLUDE = 1 << 2  # an explicit outbound include-port list exists
POD_F_IN_PORTS_INCLUDE = 1 << 3   # only listed inbound ports are steered (else all)
# The bypass on some legs only (POD_F_BYPASS, which records written before legs existed
# carry, stays "every leg"). A leg is told by the socket pair's addresses (sockops.c).
POD_F_BYPASS_OUTBOUND = 1 << 4    # app <-> its outbound sidecar (loopback, outbound port)
POD_F_BYPASS_MESH = 1 << 5        # between two pods of this node (sidecar <-> sidecar)
POD_F_BYPASS_INBOUND = 1 << 6     # other loopback pairs: inbound sidecar <-> app
BYPASS_LEGS = {"outbound": POD_F_BYPASS_OUTBOUND, "mesh": POD_F_BYPASS_MESH,
               "inbound": POD_F_BYPASS_INBOUND}   # in a request's order
# Istio's capture options (interceptor/pod/istio.py): which lookups a connect needs.
POD_F_MORE_PROXY_IDS = 1 << 7     # proxy uids/gids beyond pod_config's first (owner_rules)
POD_F_USERS_INCLUDE = 1 << 8      # capture only the uids listed (OWNER_USER_INCLUDE)
POD_F_USERS_EXCLUDE = 1 << 9
POD_F_GROUPS_INCLUDE = 1 << 10    # capture only the gids listed (OWNER_GROUP_INCLUDE)
POD_F_GROUPS_EXCLUDE = 1 << 11
POD_F_DNS = 1 << 12               # DNS to the DNS proxy (UDP and TCP port 53)
POD_F_DNS_ALL = 1 << 13           # ... whatever the nameserver (else CIDR_DNS_SERVER)
POD_F_LOOPBACK_INCLUDED = 1 << 14 # a loopback range is captured explicitly
POD_F_EXCLUDE_IFACES = 1 << 15    # interfaces excluded (CIDR_IFACE_ROUTE, PORT_IN_EXCLUDE_IFINDEX)
POD_F_HOST_LOOPBACK = 1 << 16     # loopback never captured is a range (CIDR_HOST_LOOPBACK),
                                  # not 127.0.0.1 alone

# --- Node-wide settings (settings map, index 0) ---------------------------------------
NODE_F_BYPASS = 1 << 0            # `interceptor load --no-bypass` clears it

# --- Ingress filter (xdp_pods.flags, ingress_rules values) ----------------------------
XDP_F_ALLOW_ONLY = 1 << 0         # the pod has allow rules: unmatched new flows are dropped
MATCH_DENY = 1 << 0               # ingress_rules value bits
MATCH_ALLOW = 1 << 1


class Codes:
    """A named set of stable integer codes. Plain class attributes rather than enum: this
    module is imported on every CNI call, and enum (with re) costs milliseconds there."""

    @classmethod
    def items(cls):
        return [(k, v) for k, v in vars(cls).items() if k.isupper()]

    @classmethod
    def name_of(cls, value):
        return next((k for k, v in cls.items() if v == value), None)


class PortKind(Codes):
    """Which list a port_key entry belongs to."""
    OUT_INCLUDE = 1
    OUT_EXCLUDE = 2
    IN_INCLUDE = 3
    IN_EXCLUDE = 4
    PROTECTED = 5       # ingress filter: never reachable from the network
    IN_EXCLUDE_IFINDEX = 6  # "port" is an ifindex: inbound on it is never steered


class CidrKind(Codes):
    """Which list a cidr_key entry belongs to (exclude wins over include, as in Istio).
    INGRESS_V4/V6: ingress policy sources (separate kinds so ::/0 never covers IPv4)."""
    OUT_INCLUDE = 1
    OUT_EXCLUDE = 2
    INGRESS_V4 = 3
    INGRESS_V6 = 4
    DNS_SERVER = 5      # nameservers whose queries are captured (redirect_dns)
    IFACE_ROUTE = 6     # the pod's routes: value IFACE_EXCLUDED when through an excluded interface
    HOST_LOOPBACK = 7   # loopback never captured (host_loopback_cidr, when not 127.0.0.1/32)


IFACE_EXCLUDED, IFACE_KEPT = 1, 2     # cidr_rules values of CidrKind.IFACE_ROUTE


class OwnerKind(Codes):
    """Which list an owner_rules entry belongs to."""
    PROXY_UID = 1
    PROXY_GID = 2
    USER_INCLUDE = 3
    USER_EXCLUDE = 4
    GROUP_INCLUDE = 5
    GROUP_EXCLUDE = 6


class Reason(Codes):
    """Stable counter codes: never renumber, only append. Userspace labels are the
    lower-case names; the C side uses REASON_<NAME>."""
    OUT_REDIRECTED = 1
    OUT_SKIP_PROXY_OWNER = 2
    OUT_SKIP_LOOPBACK = 3
    OUT_SKIP_LOCAL_POD = 4
    OUT_SKIP_EXCLUDED_PORT = 5
    OUT_SKIP_EXCLUDED_CIDR = 6
    OUT_SKIP_NOT_INCLUDED = 7
    OUT_PASSTHROUGH_NO_PROXY = 8
    OUT_REJECTED_NO_PROXY = 9
    ORIG_DST_ANSWERED = 10
    ORIG_DST_UNKNOWN = 11
    PEERNAME_RESTORED = 12
    IN_STEERED = 13
    IN_SKIP_EXCLUDED_PORT = 14
    IN_SKIP_LOCAL = 15
    IN_PASSTHROUGH_NO_PROXY = 16
    IN_REJECTED_NO_PROXY = 17
    BYPASS_SOCKET_ADDED = 18
    BYPASS_MSG_REDIRECTED = 19
    BYPASS_MSG_NO_PEER = 20
    ORIG_DST_RECORD_FAILED = 21
    # ingress filter (XDP, or nftables rules with the same labels)
    INGRESS_PASSED = 22
    INGRESS_PASSED_NON_IP = 23
    INGRESS_PASSED_FRAGMENT = 24        # non-first fragment: judged with its first one
    INGRESS_DROPPED_PROTECTED_PORT = 25
    INGRESS_DROPPED_DENIED = 26
    INGRESS_DROPPED_NOT_ALLOWED = 27
    INGRESS_DROPPED_MALFORMED = 28
    # the proxy connecting to its own capture port (it found no original destination
    # and fell back to its socket's own address): refused, or it would loop to itself
    OUT_REFUSED_PROXY_LOOP = 29
    # the proxy's inbound listener could not be recorded (inbound_listeners full): the
    # pod's inbound connections are not steered to it until one is
    LISTENER_RECORD_FAILED = 30
    # SO_ORIGINAL_DST on a socket with no redirect record, which the kernel could not
    # answer either: answered with the socket's own local address, as conntrack answers
    # an un-NATed connection. Inbound connections that sk_lookup delivered are this case
    # (their destination was never rewritten), and Envoy's original_dst listener filter
    # restores a destination only when the option answers.
    ORIG_DST_OWN_ADDRESS = 31
    # the proxy (its uid) connecting to its own pod over lo (a self-call through its
    # outbound cluster): sent to its inbound port, as istio-iptables' ISTIO_IN_REDIRECT
    # rule on lo does, so inbound policy and telemetry apply to it
    OUT_SELF_TO_INBOUND = 32
    # a connection from the proxy's inbound source address (127.0.0.6 / ::6) over lo:
    # the inbound hop to the app, never redirected
    OUT_SKIP_INBOUND_SOURCE = 33
    # Istio's capture options (interceptor/pod/istio.py)
    OUT_DNS_REDIRECTED = 34             # a DNS query (UDP or TCP) sent to the DNS proxy
    OUT_SKIP_OWNER_FILTER = 35          # outbound owner users / groups leave it alone
    OUT_SKIP_EXCLUDED_INTERFACE = 36
    OUT_SKIP_MARK = 37                  # the socket carries skip_mark (ztunnel's own)
    IN_SKIP_EXCLUDED_INTERFACE = 38     # also a virtual interface's traffic (never inbound)
    OUT_REROUTED = 39                   # a VM's traffic on a virtual interface (rules)
    DNS_ANSWER_RESTORED = 40            # the DNS proxy's answer shown as from the nameserver
    DNS_ZONE = 41                       # rules: a DNS datagram put in its conntrack zone


# --- Map layouts ----------------------------------------------------------------------
# Addresses are always 16 bytes in network order; IPv4 is stored v4-mapped (::ffff:a.b.c.d)
# so one key shape serves both families and an AF_INET6 socket talking to a v4-mapped
# address produces the same key as the AF_INET socket at the other end.
Addr16 = ctypes.c_uint8 * 16


class PodConfig(ctypes.Structure):
    """pods[netns_cookie]: written by enroll, read by every hook."""
    _fields_ = [
        ("proxy_uid", ctypes.c_uint32),
        ("proxy_gid", ctypes.c_uint32),
        ("outbound_port", ctypes.c_uint16),   # host order
        ("inbound_port", ctypes.c_uint16),    # host order
        ("flags", ctypes.c_uint32),
        ("skip_mark", ctypes.c_uint32),       # sockets with (mark & skip_mark_mask) ==
        ("skip_mark_mask", ctypes.c_uint32),  # skip_mark are never redirected; mask 0: none
    ]


class OwnerKey(ctypes.Structure):
    """owner_rules[{cookie, id, kind}] = 1: written by enroll."""
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("id", ctypes.c_uint32),     # a uid or gid
        ("kind", ctypes.c_uint32),   # OwnerKind
    ]


class PodAddrKey(ctypes.Structure):
    """pod_addrs[addr] = netns cookie of the pod owning addr: written by enroll, read by
    sk_lookup (which pod is this connection for) and sock_ops (is the peer on this node)."""
    _fields_ = [("addr", Addr16)]


class PortKey(ctypes.Structure):
    """port_rules[{cookie, port, kind}] = 1: written by enroll."""
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("port", ctypes.c_uint16),   # host order
        ("kind", ctypes.c_uint8),    # PortKind
        ("pad", ctypes.c_uint8 * 5),
    ]


class CidrKey(ctypes.Structure):
    """cidr_rules LPM trie: prefixlen counts bits of (kind, netns_cookie, addr), so the
    first 96 bits always match exactly and the rest is the CIDR prefix."""
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),           # CidrKind
        ("netns_cookie", ctypes.c_uint64),
        ("addr", Addr16),
    ]


CIDR_KEY_FIXED_BITS = 32 + 64


class ListenerKey(ctypes.Structure):
    """inbound_listeners sockhash key: sock_ops adds the proxy's inbound listener,
    sk_lookup assigns connections to it."""
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("family", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class SockTuple(ctypes.Structure):
    """A TCP socket as seen from itself. netns_cookie is set only when the peer address
    is loopback (loopback 4-tuples repeat across namespaces); pod addresses are unique
    on a node, so cross-namespace pairs use 0 and both ends compute the same key."""
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("local", Addr16),
        ("remote", Addr16),
        ("local_port", ctypes.c_uint16),    # host order
        ("remote_port", ctypes.c_uint16),   # host order
        ("pad", ctypes.c_uint32),
    ]


class OrigDst(ctypes.Structure):
    """A redirected connection and the destination it was meant for.
    Outbound: sk_storage on the app's socket (connect_orig: connect -> sock_ops,
    getpeername), then redirected[app socket tuple] (sock_ops, status), then, when the
    proxy's side of the connection is established, sk_storage on the proxy's accepted
    socket (proxy_orig: sock_ops -> getsockopt). The proxy may ask for SO_ORIGINAL_DST
    long after the app has closed (a client that connects and closes at once): the
    answer lives as long as the socket that asks, and the kernel frees it with it.
    Inbound: redirected[proxy's accepted socket tuple] (sk_lookup -> sock_ops, status).
    redirected entries go when their socket closes (sock_ops state callback); it is an LRU."""
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),          # host order
        ("family", ctypes.c_uint16),        # AF_INET or AF_INET6: what the app asked for
        ("direction", ctypes.c_uint8),      # DIR_OUTBOUND / DIR_INBOUND
        ("flags", ctypes.c_uint8),          # CONN_F_*
        ("proxy_port", ctypes.c_uint16),    # the proxy port it was sent to, host order
        ("netns_cookie", ctypes.c_uint64),
        ("created_ns", ctypes.c_uint64),    # CLOCK_BOOTTIME
    ]


DIR_OUTBOUND = 1
DIR_INBOUND = 2
CONN_F_ESTABLISHED = 1 << 0    # inbound: the steered SYN became a connection
CONN_F_BYPASSED = 1 << 1       # the socket is in bypass_socks


class StatKey(ctypes.Structure):
    """stats per-CPU hash: {pod, reason} -> StatValue, written by every hook."""
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class StatValue(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class XdpPodConfig(ctypes.Structure):
    """xdp_pods[netns_cookie]: written by enroll and `interceptor policy`, read by the pod's
    XDP program. Absent: the program passes everything uncounted (pod being removed)."""
    _fields_ = [
        ("flags", ctypes.c_uint32),          # XDP_F_*
        ("ephemeral_low", ctypes.c_uint16),  # pod's ip_local_port_range start, host order
        ("pad", ctypes.c_uint16),
    ]


class IngressRuleKey(ctypes.Structure):
    """ingress_rules[{pod, source set, proto, port}] = MATCH_* bits. source_set comes
    from ingress_sources (LPM on the packet's source); proto 0 / port 0 = any."""
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("source_set", ctypes.c_uint32),
        ("port", ctypes.c_uint16),           # host order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class NodeSettings(ctypes.Structure):
    """settings[0]: written by the loader."""
    _fields_ = [("flags", ctypes.c_uint32)]


# Shared structures in the order the header declares them.
STRUCTS = {
    "pod_config": PodConfig,
    "pod_addr_key": PodAddrKey,
    "port_key": PortKey,
    "owner_key": OwnerKey,
    "cidr_key": CidrKey,
    "listener_key": ListenerKey,
    "sock_tuple": SockTuple,
    "orig_dst": OrigDst,
    "stat_key": StatKey,
    "stat_value": StatValue,
    "node_settings": NodeSettings,
    "xdp_pod_config": XdpPodConfig,
    "ingress_rule_key": IngressRuleKey,
}

# --- The maps (bpf/lib/maps.h declares each) ------------------------------------------
KEYED, PER_SOCKET, SLOTS = "keyed", "per-socket", "slots"      # how userspace sees a map
POD_ENTRIES = "datapath.pod_entries"


class Map:
    """One map: its key and value types (per CPU: one value each), the capacity
    constant an operator may set (abi.h, `--map-size`), its shape (keyed: entries to
    list and count; per-socket storage: no keys; slots: a fixed few), and the one
    module that writes it from userspace (None: only the programs; a map migration
    copies any). tests/test_layers.py holds the code to the writer named here."""
    __slots__ = ("name", "key", "value", "capacity", "shape", "percpu", "counters", "writer")

    def __init__(self, name, key, value, capacity=None, shape=KEYED, percpu=False, counters=False,
                 writer=None):
        self.name, self.key, self.value, self.capacity = name, key, value, capacity
        self.shape, self.percpu, self.counters, self.writer = shape, percpu, counters, writer


MAPS = (
    Map("pods", ctypes.c_uint64, PodConfig, "MAX_PODS", writer=POD_ENTRIES),
    Map("pod_addrs", PodAddrKey, ctypes.c_uint64, "MAX_POD_ADDRS", writer=POD_ENTRIES),
    Map("port_rules", PortKey, ctypes.c_uint8, "MAX_PORT_RULES", writer=POD_ENTRIES),
    Map("cidr_rules", CidrKey, ctypes.c_uint8, "MAX_CIDRS", writer=POD_ENTRIES),
    Map("owner_rules", OwnerKey, ctypes.c_uint8, "MAX_OWNER_RULES", writer=POD_ENTRIES),
    # sock_ops adds the listeners of enrolled pods; userspace those that listened first
    Map("inbound_listeners", ListenerKey, None, "MAX_LISTENERS", writer=POD_ENTRIES),
    Map("bypass_socks", SockTuple, None, "MAX_BYPASS_SOCKETS"),
    # the programs' records; userspace removes a pod's with the pod
    Map("redirected", SockTuple, OrigDst, "MAX_REDIRECTED_SOCKETS", writer=POD_ENTRIES),
    Map("connect_orig", ctypes.c_int, OrigDst, shape=PER_SOCKET),
    Map("proxy_orig", ctypes.c_int, OrigDst, shape=PER_SOCKET),
    Map("stats", StatKey, StatValue, "MAX_STAT_KEYS", percpu=True, counters=True, writer=POD_ENTRIES),
    Map("settings", ctypes.c_uint32, NodeSettings, shape=SLOTS, writer="ops.loader"),
    Map("xdp_main", ctypes.c_uint32, ctypes.c_uint32, shape=SLOTS, writer="datapath.attach"),  # prog array
    Map("tc_main", ctypes.c_uint32, ctypes.c_uint32, shape=SLOTS, writer="datapath.attach"),   # likewise
    Map("xdp_cookie_slot", ctypes.c_uint32, ctypes.c_uint64, shape=SLOTS, percpu=True),  # stub -> filter
    Map("xdp_pods", ctypes.c_uint64, XdpPodConfig, "MAX_XDP_PODS", writer=POD_ENTRIES),
    Map("ingress_sources", CidrKey, ctypes.c_uint32, "MAX_INGRESS_SOURCES", writer=POD_ENTRIES),
    Map("ingress_rules", IngressRuleKey, ctypes.c_uint8, "MAX_INGRESS_RULES", writer=POD_ENTRIES),
)
MAP_CAPACITY = {m.name: m.capacity for m in MAPS if m.capacity}     # map -> its abi.h constant

# Plain constants exported to C under the same name.
CONSTANTS = {name: globals()[name] for name in (
    "PROXY_UID", "PROXY_GID", "OUTBOUND_PORT", "INBOUND_PORT", "HBONE_PORT",
    "INBOUND_SOURCE_V4_INT", "INBOUND_SOURCE_V6_LAST_WORD",
    "MAX_PODS", "MAX_POD_ADDRS", "MAX_CIDRS", "MAX_PORT_RULES", "MAX_REDIRECTED_SOCKETS",
    "MAX_BYPASS_SOCKETS", "MAX_LISTENERS", "MAX_STAT_KEYS", "MAX_OWNER_RULES",
    "POD_F_PASSTHROUGH", "POD_F_BYPASS", "POD_F_OUT_PORTS_INCLUDE", "POD_F_IN_PORTS_INCLUDE",
    "POD_F_BYPASS_OUTBOUND", "POD_F_BYPASS_MESH", "POD_F_BYPASS_INBOUND",
    "POD_F_MORE_PROXY_IDS", "POD_F_USERS_INCLUDE", "POD_F_USERS_EXCLUDE", "POD_F_GROUPS_INCLUDE",
    "POD_F_GROUPS_EXCLUDE", "POD_F_DNS", "POD_F_DNS_ALL", "POD_F_LOOPBACK_INCLUDED",
    "POD_F_EXCLUDE_IFACES", "POD_F_HOST_LOOPBACK", "IFACE_EXCLUDED", "IFACE_KEPT",
    "DNS_PORT", "DNS_SERVER_PORT",
    "NODE_F_BYPASS", "CIDR_KEY_FIXED_BITS",
    "DIR_OUTBOUND", "DIR_INBOUND", "CONN_F_ESTABLISHED", "CONN_F_BYPASSED",
    "MAX_INGRESS_SOURCES", "MAX_INGRESS_RULES", "MAX_XDP_PODS",
    "XDP_MAX_VLAN_TAGS", "XDP_MAX_EXT_HEADERS", "XDP_COOKIE_PLACEHOLDER",
    "XDP_F_ALLOW_ONLY", "MATCH_DENY", "MATCH_ALLOW",
)}

_C_TYPES = {
    ctypes.c_uint8: "__u8", ctypes.c_uint16: "__u16",
    ctypes.c_uint32: "__u32", ctypes.c_uint64: "__u64",
}


def _c_field(name, ctype):
    if issubclass(ctype, ctypes.Array):
        return f"{_C_TYPES[ctype._type_]} {name}[{ctype._length_}]"
    return f"{_C_TYPES[ctype]} {name}"


def render_header():
    """The C view of this module, as committed in bpf/lib/abi.h."""
    out = [
        "/* GENERATED from interceptor/abi.py by `make abi`: do not edit by hand. */",
        "#ifndef INTERCEPTOR_ABI_H",
        "#define INTERCEPTOR_ABI_H",
        "",
    ]
    overridable = set(MAP_CAPACITY.values())
    for name, value in CONSTANTS.items():
        define = f"#define {name} {value:#x}ULL" if value >= 2**31 else f"#define {name} {value}"
        out += [f"#ifndef {name}", define, "#endif"] if name in overridable else [define]
    for enum_cls, prefix in ((PortKind, "PORT_"), (CidrKind, "CIDR_"), (OwnerKind, "OWNER_"),
                             (Reason, "REASON_")):
        out.append("")
        for name, value in enum_cls.items():
            out.append(f"#define {prefix}{name} {value}")
    out.append(f"#define REASON_MAX {max(v for _, v in Reason.items()) + 1}")
    for name, struct in STRUCTS.items():
        out += ["", f"struct {name} {{"]
        out += [f"\t{_c_field(fname, ftype)};" for fname, ftype in struct._fields_]
        out.append("};")
        out.append(f"_Static_assert(sizeof(struct {name}) == {ctypes.sizeof(struct)}, "
                   f"\"{name} layout differs from interceptor/abi.py\");")
    out += ["", "#endif", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render_header(), end="")
