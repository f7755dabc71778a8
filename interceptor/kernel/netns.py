"""Network namespaces from userspace: entering one, its cookie, its addresses, and the
one look enrollment takes into a pod's namespace (`look`).

Kept to the standard library (no pyroute2 import) because enroll and the CNI plugin run
this on every pod start. setns() acts on the calling thread only; callers are
single-threaded, and the original namespace is always restored.
"""
import _thread
import collections
import contextlib
import ctypes
import fcntl
import ipaddress
import errno
import os
import socket
import struct

from interceptor.kernel import libc, netlink

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71          # Linux 5.14+
HOST_NETNS_PATH = "/proc/1/ns/net"
PROC_NET_INIT_INO = 0xEFFFFFF9   # the init namespace's fixed inode (linux/proc_ns.h)

_inside = _thread._local()     # per thread: the namespace path entered() is in


def _setns(fd):
    libc.call("setns", "setns", fd, CLONE_NEWNET)


@contextlib.contextmanager
def entered(path):
    """Run the body inside the network namespace at path (a /proc/PID/ns/net or a
    bind-mounted /run/netns/NAME), then come back. Inside it already (by this path, on
    this thread), the body just runs: a caller that asks one pod several things (status)
    enters once around all of them."""
    if "\0" in str(path):      # os.open's ValueError would escape every OSError handler
        raise FileNotFoundError(errno.ENOENT, "a path with a NUL byte", str(path).replace("\0", "\\0"))
    outer = getattr(_inside, "path", None)
    if outer == str(path):
        yield
        return
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        _inside.path = str(path)
        try:
            yield
        finally:
            _inside.path = outer
            _setns(original)
    finally:
        os.close(original)


def current_cookie():
    """The cookie of the calling thread's network namespace: SO_NETNS_COOKIE (5.14+),
    else asked through a BPF connect hook (netns_cookie_bpf: kernels 5.7 to 5.13)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
    from interceptor.kernel import netns_cookie_bpf
    return netns_cookie_bpf.current_cookie()


def cookie_source():
    """How current_cookie() learns cookies on this kernel (for doctor)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return "SO_NETNS_COOKIE"
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
        return "a BPF connect hook (no SO_NETNS_COOKIE before Linux 5.14)"


def cookie_of(path):
    with entered(path):
        return current_cookie()


def host_cookie():
    """Cookie of the node's own (init) network namespace. PID 1's namespace may be
    unreadable in some sandboxes; the init namespace is also recognisable by its fixed
    inode number, so our own namespace serves when it is the init one, and otherwise
    (a caller inside another namespace) the first process of ours found in it."""
    try:
        return cookie_of(HOST_NETNS_PATH)
    except PermissionError:
        if os.stat("/proc/thread-self/ns/net").st_ino == PROC_NET_INIT_INO:
            return current_cookie()
        for pid in (os.getppid(), *(int(p) for p in os.listdir("/proc") if p.isdigit())):
            path = f"/proc/{pid}/ns/net"
            try:
                if os.stat(path).st_ino == PROC_NET_INIT_INO:
                    return cookie_of(path)
            except OSError:
                continue
        raise


# --- addresses through a bare rtnetlink dump ------------------------------------------
_RTM_GETADDR = 22
_RTM_NEWADDR = 20
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_RT_SCOPE_UNIVERSE = 0
_IFADDRMSG = struct.Struct("=BBBBI")   # family, prefixlen, flags, scope, index


_RTM_DELADDR = 21
_LOOPBACK_IFINDEX = 1         # "lo" is ifindex 1 in every network namespace
_IFA_F_NODAD = 0x02
_IFA_PROTO = 11               # who added the address (Linux 5.18+; ignored before)
# Our mark on an address we add (IFA_PROTO: 0-3 are the kernel's own), so that a later
# run, or a sweep after the record was lost, knows the address is ours to remove.
ADDRESS_PROTO = 0x69


def _dump_addresses():
    """Global-scope addresses of the current namespace's interfaces, as ip_address
    objects; not those on lo (the proxy's ::6 there is no address of the pod's)."""
    found = {}
    request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for kind, body in netlink.dump(socket.NETLINK_ROUTE, _RTM_GETADDR, request):
        if kind != _RTM_NEWADDR:
            continue
        _, _, _, scope, index = _IFADDRMSG.unpack_from(body)
        if index == _LOOPBACK_IFINDEX:
            continue
        attrs = netlink.attributes(body, _IFADDRMSG.size)
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if raw and scope == _RT_SCOPE_UNIVERSE:
            addr = ipaddress.ip_address(raw)
            found[addr] = addr
    return list(found.values())


_RTMSG = struct.Struct("=BBBBBBBBI")   # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_RTA_DST, _RTA_OIF, _RTA_TABLE = 1, 4, 15
_RT_TABLE_MAIN, _RTN_UNICAST = 254, 1


def _dump_routes():
    """[(ip_network, output ifindex or None)] of the main table's unicast routes."""
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        request = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for kind, body in netlink.dump(socket.NETLINK_ROUTE, _RTM_GETROUTE, request):
            if kind != _RTM_NEWROUTE:
                continue
            fam, dst_len, _, _, table, _, _, rtype, _ = _RTMSG.unpack_from(body)
            attrs = netlink.attributes(body, _RTMSG.size)
            if _RTA_TABLE in attrs:
                table = struct.unpack("=I", attrs[_RTA_TABLE])[0]
            if table != _RT_TABLE_MAIN or rtype != _RTN_UNICAST or fam != family:
                continue
            raw = attrs.get(_RTA_DST)
            any_address = "0.0.0.0" if family == socket.AF_INET else "::"
            net = ipaddress.ip_network((ipaddress.ip_address(raw) if raw else any_address, dst_len))
            oif = struct.unpack("=I", attrs[_RTA_OIF])[0] if _RTA_OIF in attrs else None
            out.append((net, oif))
    return out


def interfaces_of(path, names):
    """({name: ifindex} of those of these interfaces the namespace has, [(network,
    output ifindex)] of its main routing table)."""
    with entered(path):
        found = {}
        for name in names:
            try:
                found[name] = socket.if_nametoindex(name)
            except OSError:
                pass            # not in this pod: nothing of it to exclude
        return found, _dump_routes() if found else []


def addresses_of(path):
    """The pod's own (global-scope) addresses, IPv4 and IPv6."""
    with entered(path):
        return _dump_addresses()


def _lo_address_message(addr, mark=False):
    ifa = _IFADDRMSG.pack(socket.AF_INET6, 128, _IFA_F_NODAD, _RT_SCOPE_UNIVERSE, _LOOPBACK_IFINDEX)
    msg = ifa + netlink.attribute(_IFA_LOCAL, addr.packed) + netlink.attribute(_IFA_ADDRESS, addr.packed)
    return msg + netlink.attribute(_IFA_PROTO, bytes([ADDRESS_PROTO])) if mark else msg


def ensure_lo_address_v6(path, address, before_adding=lambda: None):
    """The IPv6 address (a /128, with our mark) on the namespace's lo, in one visit:
    "added" (before_adding() ran first: the journal's note), "ours" or "other" when it
    was there already (see _lo_address_state), None when the namespace has IPv6 off."""
    addr = ipaddress.IPv6Address(address)
    with entered(path):
        there = _lo_address_state(addr)
        if there is not None:
            return there
        before_adding()
        try:
            netlink.request(socket.NETLINK_ROUTE, _RTM_NEWADDR,
                            netlink.NLM_F_CREATE | netlink.NLM_F_EXCL, _lo_address_message(addr, mark=True))
        except OSError as exc:
            if exc.errno == errno.EEXIST:       # added meanwhile by someone else
                return "other"
            if exc.errno in (errno.EACCES, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                return None         # IPv6 disabled in the namespace (disable_ipv6 on lo)
            raise
    return "added"


def remove_lo_address_v6(path, address):
    """Take the address off the namespace's lo (nothing when it is not there)."""
    addr = ipaddress.IPv6Address(address)
    with entered(path):
        try:
            netlink.request(socket.NETLINK_ROUTE, _RTM_DELADDR, 0, _lo_address_message(addr))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EAFNOSUPPORT):
                raise


def lo_address_v6(path, address):
    """Whether the namespace's lo has the address: None, "ours" or "other"."""
    with entered(path):
        return _lo_address_state(ipaddress.IPv6Address(address))


def _lo_address_state(addr):
    """In the current namespace: None (absent), "ours" (marked with ADDRESS_PROTO), or
    "other" (not marked: someone else's, or added on a kernel that keeps no mark, <5.18)."""
    request = _IFADDRMSG.pack(socket.AF_INET6, 0, 0, 0, 0)
    found = None
    for kind, body in netlink.dump(socket.NETLINK_ROUTE, _RTM_GETADDR, request):
        if kind != _RTM_NEWADDR or _IFADDRMSG.unpack_from(body)[4] != _LOOPBACK_IFINDEX:
            continue
        attrs = netlink.attributes(body, _IFADDRMSG.size)
        if (attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)) == addr.packed:
            found = "ours" if attrs.get(_IFA_PROTO) == bytes([ADDRESS_PROTO]) else "other"
    return found


# --- interfaces ------------------------------------------------------------------------
_ARPHRD_ETHER = 1
_SIOCGIFHWADDR = 0x8927
_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x3


def _ethernet_interfaces(ifname=None):
    """[(name, ifindex, driver)] of the current namespace's Ethernet interfaces (not lo,
    not tunnel fallback devices); only ifname when given."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for index, name in socket.if_nameindex():
            if ifname and name != ifname:
                continue
            ifr = struct.pack("16s24x", name.encode())
            try:
                res = fcntl.ioctl(s.fileno(), _SIOCGIFHWADDR, ifr)
            except OSError:
                continue
            if struct.unpack_from("H", res, 16)[0] == _ARPHRD_ETHER:
                found.append((name, index, _driver(s, name)))
    return found


def _driver(sock, name):
    """The interface's driver name (ethtool's GDRVINFO), "" when it will not say."""
    info = ctypes.create_string_buffer(196)             # struct ethtool_drvinfo
    struct.pack_into("I", info, 0, _ETHTOOL_GDRVINFO)
    ifr = struct.pack("16sP16x", name.encode(), ctypes.addressof(info))
    try:
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifr)
    except OSError:
        return ""
    return info.raw[4:36].split(b"\0")[0].decode(errors="replace")


DEFAULT_EPHEMERAL_LOW = 32768


def _ephemeral_low():
    """Start of the namespace's ip_local_port_range (a per-netns sysctl, read through
    /proc/sys opened from inside the namespace)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


# --- the one look into a pod's namespace ----------------------------------------------
# Named tuples, not dataclasses: `dataclasses` imports `inspect`, ~14 ms on every CNI call.
# driver: "" when the driver will not say; xdp_prog_id: the XDP program attached now
# (any mode), 0 if none.
Interface = collections.namedtuple("Interface", "name index driver xdp_prog_id")
# What enrollment needs to know of a pod's namespace, read in one visit: addresses are
# global-scope ip_address objects, v4 then v6; interfaces the CNI interface when named,
# else every Ethernet one; ephemeral_low: UDP to ports below it opens a flow, above, a reply.
PodNetns = collections.namedtuple("PodNetns", "path cookie addresses interfaces ephemeral_low")


def look(path, ifname=None, xdp=False):
    """One visit to the namespace at path (OSError when it cannot be entered). xdp: also
    ask which XDP program each interface has (needs libbpf; only the XDP filter asks).
    The proxy's listeners are not looked at here: they must be looked for after capture
    is switched on, or a proxy that listens in between would be missed."""
    with entered(path):
        cookie = current_cookie()
        addresses = sorted(_dump_addresses(), key=lambda a: (a.version, a))
        found = _ethernet_interfaces(ifname)
        if xdp:
            from interceptor.kernel import libbpf
            interfaces = tuple(Interface(n, i, d, libbpf.xdp_query_id(i)) for n, i, d in found)
        else:
            interfaces = tuple(Interface(n, i, d, 0) for n, i, d in found)
        low = _ephemeral_low()
    return PodNetns(str(path), cookie, tuple(addresses), interfaces, low)
