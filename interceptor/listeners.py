"""Registering a proxy listener that already existed when its pod was enrolled.

sock_ops registers the proxy's inbound listener when it calls listen(), but only in an
enrolled namespace; a proxy that started first is found here instead: its socket inode
from /proc/net/tcp{,6} inside the namespace, the owning process from /proc/*/fd, and a
duplicate of the descriptor through pidfd_getfd() to hand to the sockhash.
"""
import ctypes
import os
import socket

from . import abi, netns

_SYS_pidfd_getfd = 438
_libc = ctypes.CDLL(None, use_errno=True)
_TCP_LISTEN = "0A"


def _listener_inodes(port):
    """{inode: family} of TCP listeners on port, in the current namespace."""
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == _TCP_LISTEN and int(parts[1].rsplit(":", 1)[1], 16) == port:
                found[int(parts[9])] = family
    return found


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
