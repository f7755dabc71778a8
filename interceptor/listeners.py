"""Registering a proxy listener that already existed when its pod was enrolled.

sock_ops registers the proxy's inbound listener when it calls listen(), but only in an
enrolled namespace; a proxy that started first is found here instead: its socket inode
through sock_diag inside the namespace, the owning process from /proc/*/fd, and a
duplicate of the descriptor through pidfd_getfd() to hand to the sockhash.
"""
import ctypes
import os
import socket
import struct

from . import abi, netns

_SYS_pidfd_getfd = 438
_libc = ctypes.CDLL(None, use_errno=True)


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_TCP_LISTEN = 10


def _listener_inodes(port):
    """{inode: family} of TCP listeners on port in the current namespace, through
    sock_diag (reading /proc/net/tcp walks every socket of the node: ~10 ms)."""
    found = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            # inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed sockid
            req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN) + bytes(48)
            nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY,
                                _NLM_F_REQUEST_DUMP, 1, 0) + req)
            done = False
            while not done:
                data = nl.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, msg_type = struct.unpack_from("=IH", data, off)
                    if msg_type in (_NLMSG_DONE, _NLMSG_ERROR):
                        done = True
                        break
                    # inet_diag_msg: family, state, timer, retrans, sockid (sport first,
                    # big-endian), expires, rqueue, wqueue, uid, inode
                    sport = struct.unpack_from("!H", data, off + 16 + 4)[0]
                    inode = struct.unpack_from("=I", data, off + 16 + 68)[0]
                    if sport == port:
                        found[inode] = family
                    off += (length + 3) & ~3
    return found


def listening(netns_path, port):
    """Does anything listen on TCP port in the namespace at netns_path?"""
    with netns.entered(netns_path):
        return bool(_listener_inodes(port))


def _owner_fd(inode):
    """(pid, fd) of some process holding socket inode."""
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return int(pid), int(fd)
            except OSError:
                continue
    return None


def _dup_from(pid, fd):
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(_SYS_pidfd_getfd, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
        return new
    finally:
        os.close(pidfd)


def register_existing(maps, cookie, netns_path, port):
    """Put already-listening sockets on port into inbound_listeners. Returns how many."""
    with netns.entered(netns_path):
        inodes = _listener_inodes(port)
    registered = 0
    for inode, family in inodes.items():
        owner = _owner_fd(inode)
        if owner is None:
            continue
        try:
            fd = _dup_from(*owner)
        except OSError:
            continue   # the process went away meanwhile
        try:
            key = abi.ListenerKey(netns_cookie=cookie, family=family)
            maps.inbound_listeners.put(key, ctypes.c_uint32(fd))
            registered += 1
        finally:
            os.close(fd)
    return registered
