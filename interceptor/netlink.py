"""A bare netlink dump (rtnetlink, sock_diag) in the current network namespace, without
pyroute2: enroll and the CNI plugin need only a few messages and must start fast."""
import socket
import struct

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
_HEADER = struct.Struct("=IHHII")     # nlmsghdr: len, type, flags, seq, pid


def dump(protocol, msg_type, payload):
    """Yield (type, message bytes after the header) for every message of the dump's
    answer. An NLMSG_ERROR is raised as OSError with the kernel's errno: a failed dump
    must not read as an empty one."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as nl:
        nl.send(_HEADER.pack(_HEADER.size + len(payload), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                + payload)
        while True:
            data = nl.recv(65536)
            off = 0
            while off + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, off)
                if length < _HEADER.size:
                    raise OSError(f"netlink: malformed message of {length} bytes")
                if kind == NLMSG_DONE:
                    return
                body = data[off + _HEADER.size:off + length]
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
                    raise OSError(err, f"netlink dump {msg_type}: error {err}")
                yield kind, body
                off += (length + 3) & ~3


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
