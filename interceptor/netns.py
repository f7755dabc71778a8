"""Network namespaces from userspace: entering one, its cookie, its addresses.

Kept to the standard library (no pyroute2 import) because enroll and the CNI plugin run
this on every pod start. setns() acts on the calling thread only; callers are
single-threaded, and the original namespace is always restored.
"""
import contextlib
import ctypes
import ipaddress
import os
import socket
import struct

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71          # Linux 5.14+
HOST_NETNS_PATH = "/proc/1/ns/net"
PROC_NET_INIT_INO = 0xEFFFFFF9   # the init namespace's fixed inode (linux/proc_ns.h)

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


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
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_RT_SCOPE_UNIVERSE = 0


def _dump_addresses():
    """Global-scope addresses of the current namespace, as ip_address objects."""
    found = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        req = struct.pack("=IHHII", 16 + 8, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        req += struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)
        nl.send(req)
        while True:
            data = nl.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, msg_type, _, _, _ = struct.unpack_from("=IHHII", data, off)
                if msg_type == _NLMSG_DONE:
                    return list(found.values())
                if msg_type == _NLMSG_ERROR:
                    raise OSError("rtnetlink address dump failed")
                if msg_type == _RTM_NEWADDR:
                    family, _, _, scope, index = struct.unpack_from("=BBBBI", data, off + 16)
                    attrs = _parse_attrs(data, off + 24, off + length)
                    raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
                    if raw and scope == _RT_SCOPE_UNIVERSE:
                        addr = ipaddress.ip_address(raw)
                        found[addr] = addr
                off += (length + 3) & ~3


def _parse_attrs(data, off, end):
    attrs = {}
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        attrs[atype] = bytes(data[off + 4:off + alen])
        off += (alen + 3) & ~3
    return attrs


def addresses_of(path):
    """The pod's own (global-scope) addresses, IPv4 and IPv6."""
    with entered(path):
        return _dump_addresses()
