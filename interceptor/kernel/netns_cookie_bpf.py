"""A network namespace's cookie on kernels without SO_NETNS_COOKIE (5.7 to 5.13: Debian
11's 5.10 among them), asked of the kernel through BPF instead.

Pods are known by their netns cookie everywhere (records, maps, status), so a node whose
kernel cannot tell it from userspace could enroll nothing, not even with REDIRECT rules.
bpf_get_netns_cookie() exists in cgroup connect hooks since 5.7: a throw-away program on
the calling process's own cgroup records the cookie of a connect() to one address no
one else uses (random, in 127/8, with a random port: a UDP connect sends nothing), and
the caller makes that connect from inside the namespace. Program, map and link are
released before returning; the hook lets every connect through unchanged.
"""
import ctypes
import os
import random
import socket
import struct

from interceptor.kernel import libbpf, mounts
from interceptor.kernel.libbpf import AttachType, MapType, ProgType

HELPER_MAP_UPDATE_ELEM = 2
_SOCK_ADDR_USER_IP4 = 4          # offsetof(struct bpf_sock_addr, user_ip4)
_SOCK_ADDR_USER_PORT = 24        # offsetof(struct bpf_sock_addr, user_port)


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _program(map_fd, ip_le, port_le):
    """connect4: if the destination is (ip, port), map[0] = bpf_get_netns_cookie(ctx);
    always allow. ip_le/port_le: the fields as a 32-bit load reads them, compared in 32
    bits (JMP32): a 64-bit compare would sign-extend the immediate."""
    exit_ok = 17
    insns = [
        _insn(0xbf, dst=6, src=1),                                  # r6 = ctx
        _insn(0x61, dst=2, src=6, off=_SOCK_ADDR_USER_IP4),         # r2 = user_ip4
        _insn(0x56, dst=2, off=exit_ok - 2 - 1, imm=ip_le),         # if w2 != ip: allow
        _insn(0x61, dst=2, src=6, off=_SOCK_ADDR_USER_PORT),        # r2 = user_port
        _insn(0x56, dst=2, off=exit_ok - 4 - 1, imm=port_le),       # if w2 != port: allow
        _insn(0xbf, dst=1, src=6),                                  # r1 = ctx
        _insn(0x85, imm=libbpf.HELPER_GET_NETNS_COOKIE),                   # r0 = cookie
        _insn(0x7b, dst=10, src=0, off=-8),                         # *(u64 *)(fp - 8) = r0
        _insn(0x62, dst=10, off=-12, imm=0),                        # *(u32 *)(fp - 12) = 0
        _insn(0x18, dst=1, src=1, imm=map_fd), _insn(0),            # r1 = map
        _insn(0xbf, dst=2, src=10), _insn(0x07, dst=2, imm=-12),    # r2 = &key
        _insn(0xbf, dst=3, src=10), _insn(0x07, dst=3, imm=-8),     # r3 = &value
        _insn(0xb7, dst=4, imm=0),                                  # r4 = BPF_ANY
        _insn(0x85, imm=HELPER_MAP_UPDATE_ELEM),
        _insn(0xb7, dst=0, imm=1),                                  # exit_ok: allow
        _insn(0x95),
    ]
    assert len(insns) == exit_ok + 2
    return b"".join(insns)


def _own_cgroup():
    """The cgroup2 directory of this process (where its new sockets are accounted)."""
    root = mounts.find("cgroup2")
    if not root:
        raise OSError(0, "no cgroup2 mount to attach the cookie probe to")
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(root, line.strip()[3:].lstrip("/"))
    raise OSError(0, "this process is in no cgroup2 group")


def current_cookie():
    """The cookie of the calling thread's network namespace (the caller has entered it)."""
    ip = "127.%d.%d.%d" % (random.randrange(1, 255), random.randrange(0, 256), random.randrange(1, 255))
    port = random.randrange(1024, 65536)
    ip_le = struct.unpack("<i", socket.inet_aton(ip))[0]
    port_le = struct.unpack("<i", struct.pack(">H", port) + b"\0\0")[0]
    m = libbpf.map_create(MapType.ARRAY, 4, 8, 1)
    try:
        prog = libbpf.prog_load(ProgType.CGROUP_SOCK_ADDR, "ic_netns_cookie",
                                _program(m, ip_le, port_le), AttachType.CGROUP_INET4_CONNECT)
        try:
            cg = os.open(_own_cgroup(), os.O_RDONLY | os.O_DIRECTORY)
            try:
                link = libbpf.link_create(prog, cg, AttachType.CGROUP_INET4_CONNECT)
            finally:
                os.close(cg)
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    try:
                        s.connect((ip, port))
                    except OSError:
                        pass     # no route (lo down, say): the hook ran before routing
            finally:
                os.close(link)
        finally:
            os.close(prog)
        value = ctypes.c_uint64(0)
        libbpf.map_lookup(m, ctypes.c_uint32(0), value)
        cookie = value.value
    finally:
        os.close(m)
    if not cookie:
        raise OSError(0, "the cookie probe's connect hook did not run")
    return cookie
