"""The few libbpf calls userspace needs, through ctypes on libbpf.so.1.

Used by every path that must stay fast and must not compile (enroll, CNI, status):
opening pinned objects, map element access, links and attachments. libbpf >= 1.0
returns -errno directly, which is turned into OSError here.
"""
import ctypes
import errno
import os

# Kernel UAPI numbers (linux/bpf.h); these are the kernel's, not ours.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_ALLOW_MULTI = 1 << 1


class AttachType:
    CGROUP_SOCK_OPS = 3
    SK_MSG_VERDICT = 7
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    SK_LOOKUP = 36
    XDP = 37


class ProgType:
    SOCKET_FILTER = 1
    SCHED_CLS = 3
    XDP = 6
    SOCK_OPS = 13
    SK_MSG = 16
    CGROUP_SOCK_ADDR = 18
    CGROUP_SOCKOPT = 25
    SK_LOOKUP = 30


class MapType:
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERCPU_HASH = 5
    LRU_HASH = 9
    LPM_TRIE = 11
    SOCKHASH = 18
    SK_STORAGE = 24


_lib = None


def lib():
    """libbpf.so.1, loaded on first use."""
    global _lib
    if _lib is None:
        # by soname: ctypes.util.find_library would spawn ldconfig on every CNI call
        try:
            _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise OSError(errno.ENOENT, f"libbpf.so.1 is not installed ({exc})") from exc
        _declare(_lib)
    return _lib


def _declare(l):
    c_int, c_uint, c_char_p, c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_void_p
    sigs = {
        "bpf_obj_get": ([c_char_p], c_int),
        "bpf_obj_pin": ([c_int, c_char_p], c_int),
        "bpf_map_lookup_elem": ([c_int, c_void_p, c_void_p], c_int),
        "bpf_map_update_elem": ([c_int, c_void_p, c_void_p, ctypes.c_uint64], c_int),
        "bpf_map_delete_elem": ([c_int, c_void_p], c_int),
        "bpf_map_get_next_key": ([c_int, c_void_p, c_void_p], c_int),
        "bpf_map_lookup_batch": ([c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                  ctypes.POINTER(ctypes.c_uint32), c_void_p], c_int),
        "bpf_link_create": ([c_int, c_int, c_uint, c_void_p], c_int),
        "bpf_link_detach": ([c_int], c_int),
        "bpf_link_update": ([c_int, c_int, c_void_p], c_int),
        "bpf_prog_attach": ([c_int, c_int, c_uint, c_uint], c_int),
        "bpf_prog_detach2": ([c_int, c_int, c_uint], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32)], c_int),
        "bpf_prog_query": ([c_int, c_uint, c_uint, ctypes.POINTER(ctypes.c_uint32),
                            ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)], c_int),
        "bpf_prog_load": ([c_uint, c_char_p, c_char_p, c_void_p, ctypes.c_size_t, c_void_p], c_int),
        "bpf_map_create": ([c_uint, c_char_p, c_uint, c_uint, c_uint, c_void_p], c_int),
        "libbpf_num_possible_cpus": ([], c_int),
        "bpf_xdp_query": ([c_int, c_int, c_void_p], c_int),
        "bpf_xdp_attach": ([c_int, c_int, ctypes.c_uint32, c_void_p], c_int),
        "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], c_int),
        "bpf_prog_test_run_opts": ([c_int, c_void_p], c_int),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(l, name)
        fn.argtypes = args
        fn.restype = res


def _check(ret, what):
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_get(path):
    """fd of a pinned object (map, program or link)."""
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"open pinned {path}")


def obj_pin(fd, path):
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin {path}")


def map_update(fd, key, value, flags=BPF_ANY):
    _check(lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
           "map update")


def map_lookup(fd, key, value):
    """Fill value for key; False when the key is absent."""
    ret = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map lookup")
    return True


def map_delete(fd, key):
    """Delete key; False when it was already absent."""
    ret = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map delete")
    return True


def map_keys(fd, key_type):
    """All keys of a map (a snapshot: entries may come and go meanwhile)."""
    keys = []
    prev = None
    while True:
        nxt = key_type()
        ret = lib().bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                         ctypes.byref(nxt))
        if ret == -errno.ENOENT:
            return keys
        _check(ret, "map iterate")
        keys.append(nxt)
        prev = nxt


class MapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


# Map types whose entries BPF_MAP_LOOKUP_BATCH reads (Linux 5.6): hashes, LRU included.
BATCH_MAP_TYPES = frozenset({1, 5, 9, 10})   # HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH
_BATCH = 4096


def map_batches(fd, key_size, value_size):
    """Every entry of a hash map as raw (keys, values, count) batches, thousands per
    syscall where map_keys takes one per key (a pod's removal sweeps maps that grow with
    pods and connections). value_size: the whole value (a per-CPU map's, times the
    CPUs). A snapshot, like map_keys; OSError where the kernel has no batch operations."""
    keys = ctypes.create_string_buffer(key_size * _BATCH)
    values = ctypes.create_string_buffer(value_size * _BATCH)
    token_in, token_out = ctypes.c_uint64(), ctypes.c_uint64()     # a hash's bucket number
    opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts))
    first = True
    while True:
        count = ctypes.c_uint32(_BATCH)
        ret = lib().bpf_map_lookup_batch(fd, None if first else ctypes.byref(token_in),
                                         ctypes.byref(token_out), keys, values, ctypes.byref(count),
                                         ctypes.byref(opts))
        err = -ret if ret < -1 else (ctypes.get_errno() if ret == -1 else 0)
        if err and err != errno.ENOENT:
            raise OSError(err, f"map batch lookup: {os.strerror(err)}")
        if count.value:
            yield keys.raw[:key_size * count.value], values.raw[:value_size * count.value], count.value
        if err == errno.ENOENT:     # the last batch
            return
        token_in.value, first = token_out.value, False


def num_possible_cpus():
    return _check(lib().libbpf_num_possible_cpus(), "count possible CPUs")


class LinkCreateOpts(ctypes.Structure):
    # struct bpf_link_create_opts: sz, flags, then a union we leave zeroed.
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("union", ctypes.c_uint64 * 4)]


def link_create(prog_fd, target_fd, attach_type, flags=0):
    opts = LinkCreateOpts(sz=ctypes.sizeof(LinkCreateOpts), flags=flags)
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, ctypes.byref(opts)),
                  "create link")


def link_update(link_fd, new_prog_fd):
    """Replace the program inside a link, atomically: the hook never runs without one."""
    _check(lib().bpf_link_update(link_fd, new_prog_fd, None), "update link")


def link_detach(link_fd):
    _check(lib().bpf_link_detach(link_fd), "detach link")


def prog_attach(prog_fd, target_fd, attach_type, flags=0):
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach program")


def prog_detach(prog_fd, target_fd, attach_type):
    ret = lib().bpf_prog_detach2(prog_fd, target_fd, attach_type)
    if ret == -errno.ENOENT:
        return False
    _check(ret, "detach program")
    return True


def prog_query(target_fd, attach_type):
    """IDs of the programs attached to target_fd for attach_type."""
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(len(ids))
    flags = ctypes.c_uint32(0)
    ret = lib().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids,
                               ctypes.byref(count))
    _check(ret, "query attached programs")
    return list(ids[:count.value])


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class ProgInfo(ctypes.Structure):
    # struct bpf_prog_info up to name
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16)]


class LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union; for netns links the union
    # starts with netns_ino, attach_type; for cgroup links cgroup_id (u64), attach_type.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("u0", ctypes.c_uint64), ("u1", ctypes.c_uint64)]


def obj_info(fd, info_type):
    info = info_type()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "object info")
    return info


class ProgLoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts (libbpf 1.1), the fields up to expected_attach_type.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    ]


class XdpQueryOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", ctypes.c_uint32),
                ("drv_prog_id", ctypes.c_uint32), ("hw_prog_id", ctypes.c_uint32),
                ("skb_prog_id", ctypes.c_uint32), ("attach_mode", ctypes.c_uint8)]


def _xdp_query(ifindex):
    opts = XdpQueryOpts(sz=ctypes.sizeof(XdpQueryOpts))
    _check(lib().bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"query XDP on ifindex {ifindex}")
    return opts


def xdp_attach(ifindex, prog_fd, flags):
    """The classic netlink attachment (no link): doctor's probe, and tests standing in for
    an operator's own program."""
    _check(lib().bpf_xdp_attach(ifindex, prog_fd, flags, None), f"attach XDP to ifindex {ifindex}")


def xdp_query_id(ifindex):
    """Id of the XDP program on an interface of the current netns (0: none)."""
    o = _xdp_query(ifindex)
    return o.prog_id or o.drv_prog_id or o.skb_prog_id or o.hw_prog_id


def xdp_query_mode(ifindex):
    """XDP_ATTACHED_*: 0 none, 1 driver, 2 skb (generic), 3 hw, 4 multi."""
    return _xdp_query(ifindex).attach_mode


def prog_name_by_id(prog_id):
    try:
        fd = _check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program {prog_id}")
    except OSError:
        return None
    try:
        return obj_info(fd, ProgInfo).name.decode()
    finally:
        os.close(fd)


class VerifierRejection(OSError):
    """The kernel refused a program: errno, the log's tail (str) and `reason`, the
    verifier's own words in one line ("program of this type cannot use helper ...")."""

    def __init__(self, err, name, log):
        lines = [line for line in log.splitlines() if line.strip()]
        self.reason = verifier_reason(lines) or os.strerror(err)
        super().__init__(err, f"load {name}: {os.strerror(err)}\n" + "\n".join(lines[-8:]))


def verifier_reason(lines):
    """The line of a verifier log that says why: the last one that is neither an
    instruction (`12: (85) call ...`), register state, nor the closing statistics."""
    import re
    skip = re.compile(r"^(\d+: |; |processed \d+ insns|verification time|stack depth|"
                      r"from \d+ to \d+|\s*R\d|last_idx|regs=|mark_precise|func#|\.\.\.)")
    for line in reversed(lines):
        line = line.strip()
        if line and not skip.match(line):
            return line
    return ""


def prog_load(prog_type, name, insns, expected_attach_type=0):
    """Load raw instructions; a verifier rejection raises VerifierRejection."""
    buf = (ctypes.c_uint64 * (len(insns) // 8)).from_buffer_copy(insns)
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=expected_attach_type)
    ret = lib().bpf_prog_load(prog_type, name.encode(), b"GPL", buf, len(insns) // 8,
                              ctypes.byref(opts))
    if ret >= 0:
        return ret
    log = ctypes.create_string_buffer(1 << 20)
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=expected_attach_type,
                        log_level=1, log_size=len(log), log_buf=ctypes.cast(log, ctypes.c_char_p))
    ret = lib().bpf_prog_load(prog_type, name.encode(), b"GPL", buf, len(insns) // 8,
                              ctypes.byref(opts))
    if ret >= 0:
        return ret
    raise VerifierRejection(-ret, name, log.value.decode(errors="replace"))


def load_trivial_prog(prog_type, expected_attach_type, return_value):
    """Load `r0 = return_value; exit`: enough to ask the kernel whether it supports a
    program type and attach point, without a compiler."""
    insns = (ctypes.c_uint64 * 2)(
        0xb7 | (return_value << 32),   # BPF_ALU64 | BPF_MOV | BPF_K, dst r0
        0x95,                          # BPF_JMP | BPF_EXIT
    )
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=expected_attach_type)
    return _check(lib().bpf_prog_load(prog_type, b"ic_probe", b"GPL", insns, 2,
                                      ctypes.byref(opts)), "load probe program")


HELPER_GET_NETNS_COOKIE = 122


def load_helper_probe_prog(prog_type, expected_attach_type, return_value, helper):
    """Load `call helper(ctx); r0 = return_value; exit`: does this program type get
    that helper on this kernel? (Helpers reach program types one kernel at a time.)"""
    insns = (ctypes.c_uint64 * 3)(
        0x85 | (helper << 32),         # BPF_JMP | BPF_CALL, r1 is still the context
        0xb7 | (return_value << 32),
        0x95,
    )
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=expected_attach_type)
    return _check(lib().bpf_prog_load(prog_type, b"ic_probe", b"GPL", insns, 3,
                                      ctypes.byref(opts)), "load probe program")


def pinned_info(pin, info_type):
    """The info of a pinned object, or None when there is no such pin."""
    try:
        fd = obj_get(pin)
    except OSError:
        return None
    try:
        return obj_info(fd, info_type)
    finally:
        os.close(fd)


def detach_link_pin(pin):
    """Detach a pinned link and remove its pin. Safe when the link is already defunct
    (its cgroup, netns or interface went away) or the pin unreadable."""
    try:
        fd = obj_get(pin)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            link_detach(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    os.unlink(pin)


class TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf 1.x)
    __test__ = False    # not a pytest class, whatever its name
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


def prog_test_run(prog_fd, data, repeat=1):
    """BPF_PROG_TEST_RUN: run a loaded program on one packet in the kernel, attached to
    nothing. Returns (the program's return value, mean ns per run)."""
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                       data_size_in=len(data), repeat=repeat)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run")
    return opts.retval, opts.duration


def map_create(map_type, key_size, value_size, max_entries):
    return _check(lib().bpf_map_create(map_type, b"ic_probe", key_size, value_size,
                                       max_entries, None), "create map")
