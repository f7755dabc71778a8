"""Network namespaces from userspace: entering one, its cookie, its addresses.

Kept to the standard library (no pyroute2 import) because enroll and the CNI plugin run
this on every pod start. setns() acts on the calling thread only; callers are
single-threaded, and the original namespace is always restored.
"""
import contextlib
import ipaddress
import os
import socket
import struct

from . import libc, netlink

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71          # Linux 5.14+
HOST_NETNS_PATH = "/proc/1/ns/net"
PROC_NET_INIT_INO = 0xEFFFFFF9   # the init namespace's fixed inode (linux/proc_ns.h)

def _setns(fd):
    libc.call("setns", "setns", fd, CLONE_NEWNET)


@contextlib.contextmanager
def entered(path):
    """Run the body inside the network namespace at path (a /proc/PID/ns/net or a
    bind-mounted /run/netns/NAME), then come back."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(original)


def current_cookie():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


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


def _dump_addresses():
    """Global-scope addresses of the current namespace, as ip_address objects."""
    found = {}
    request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for kind, body in netlink.dump(socket.NETLINK_ROUTE, _RTM_GETADDR, request):
        if kind != _RTM_NEWADDR:
            continue
        _, _, _, scope, _ = _IFADDRMSG.unpack_from(body)
        attrs = netlink.attributes(body, _IFADDRMSG.size)
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if raw and scope == _RT_SCOPE_UNIVERSE:
            addr = ipaddress.ip_address(raw)
            found[addr] = addr
    return list(found.values())


def addresses_of(path):
    """The pod's own (global-scope) addresses, IPv4 and IPv6."""
    with entered(path):
        return _dump_addresses()
