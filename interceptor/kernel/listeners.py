"""Finding a proxy's listening sockets that existed before its pod was enrolled.

sock_ops registers the proxy's inbound listener when it calls listen(), but only in an
enrolled namespace; a proxy that started first is found here instead: its socket inode
through sock_diag inside the namespace, the owning process from /proc/*/fd, and a
duplicate of the descriptor through pidfd_getfd(), which the caller hands to the
inbound_listeners map (datapath/pod_entries.py).
"""
import errno
import os
import socket
import struct

from interceptor.kernel import libc, netlink, netns

_SYS_pidfd_getfd = 438


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_TCP_LISTEN = 10


def _listener_inodes(port):
    """{inode: family} of TCP listeners on port in the current namespace, through
    sock_diag (reading /proc/net/tcp walks every socket of the node: ~10 ms)."""
    found = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        # inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed sockid
        req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN) + bytes(48)
        try:
            messages = list(netlink.dump(_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, req))
        except OSError as exc:
            # no sock_diag handler for the family: IPv6 disabled on this node (ipv6.disable=1)
            if exc.errno == errno.ENOENT and family == socket.AF_INET6:
                continue
            raise
        for _, msg in messages:
            # inet_diag_msg: family, state, timer, retrans, sockid (sport first,
            # big-endian), expires, rqueue, wqueue, uid, inode
            sport = struct.unpack_from("!H", msg, 4)[0]
            inode = struct.unpack_from("=I", msg, 68)[0]
            if sport == port:
                found[inode] = family
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
        return libc.call("pidfd_getfd", "syscall", _SYS_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def each_listening(netns_path, port, each):
    """each(family, fd) for every socket listening on port in the namespace (a dup of
    the owning process's fd, closed afterwards). Returns how many."""
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
            each(family, fd)
            registered += 1
        finally:
            os.close(fd)
    return registered
