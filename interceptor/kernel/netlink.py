"""Bare netlink dumps and requests (rtnetlink, sock_diag) in the current network
namespace, without pyroute2: enroll and the CNI plugin need only a few messages and
must start fast."""
import os
import socket
import struct

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
_HEADER = struct.Struct("=IHHII")     # nlmsghdr: len, type, flags, seq, pid


def _exchange(protocol, msg_type, flags, payload):
    """Send one message; yield (type, body) of each message of the answer, up to and
    including NLMSG_DONE or NLMSG_ERROR (body: the bytes after the header)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as nl:
        nl.send(_HEADER.pack(_HEADER.size + len(payload), msg_type, NLM_F_REQUEST | flags, 1, 0) + payload)
        while True:
            data = nl.recv(65536)
            off = 0
            while off + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, off)
                if length < _HEADER.size:
                    raise OSError(f"netlink: malformed message of {length} bytes")
                yield kind, data[off + _HEADER.size:off + length]
                off += (length + 3) & ~3


def _errno(body):
    return -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0


def dump(protocol, msg_type, payload):
    """Yield (type, message bytes after the header) for every message of the dump's
    answer. An NLMSG_ERROR is raised as OSError with the kernel's errno: a failed dump
    must not read as an empty one."""
    for kind, body in _exchange(protocol, msg_type, NLM_F_DUMP, payload):
        if kind == NLMSG_DONE:
            return
        if kind == NLMSG_ERROR:
            err = _errno(body)
            raise OSError(err, f"netlink dump {msg_type}: error {err}")
        yield kind, body


def request(protocol, msg_type, flags, payload):
    """Send one request and wait for the kernel's acknowledgement; an error comes back
    as OSError with the kernel's errno."""
    for kind, body in _exchange(protocol, msg_type, NLM_F_ACK | flags, payload):
        if kind == NLMSG_ERROR:
            err = _errno(body)
            if err:
                raise OSError(err, f"netlink request {msg_type}: {os.strerror(err)}")
            return


def attributes(data, off=0):
    """{type: payload} of the rtattrs from off to the end of data."""
    attrs = {}
    while off + 4 <= len(data):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        attrs[atype] = bytes(data[off + 4:off + alen])
        off += (alen + 3) & ~3
    return attrs


def attribute(atype, payload):
    """One rtattr, padded to 4 bytes."""
    data = struct.pack("=HH", 4 + len(payload), atype) + payload
    return data + b"\0" * (-len(data) % 4)
