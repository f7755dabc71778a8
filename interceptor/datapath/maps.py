"""Typed handles on the pinned maps, for userspace that must not import BCC."""
import ctypes
import errno
import os

from interceptor import abi, paths
from interceptor.kernel import libbpf

ENOTSUPP = 524      # the kernel's own "not supported", which reaches userspace as is

# Views of abi.MAPS, the one table of the maps. name -> (key type, value type); per-CPU
# maps hold one value per possible CPU.
LAYOUT = {m.name: (m.key, m.value) for m in abi.MAPS}
PERCPU = {m.name for m in abi.MAPS if m.percpu}
COUNTERS = {m.name for m in abi.MAPS if m.counters}            # a migration adds them up
SK_STORAGE = tuple(m.name for m in abi.MAPS if m.shape == abi.PER_SOCKET)   # no keys to list or count
SINGLE_SLOT = tuple(m.name for m in abi.MAPS if m.shape == abi.SLOTS)      # a fixed few entries
# Maps whose fill level status and metrics report (entries / capacity).
REPORTED = tuple(name for name in LAYOUT if name not in SK_STORAGE + SINGLE_SLOT)


class LayoutError(Exception):
    """A pinned map whose key or value size is not the one this code was built with: the
    loaded datapath is another version (say, mid-upgrade). Writing to it would corrupt it."""


class MapFullError(OSError):
    """A map at its capacity refused an entry (E2BIG from a hash, ENOSPC from a trie)."""

    def __str__(self):
        return self.strerror


class PinnedMap:
    def __init__(self, name):
        self.name = name
        self.key_type, self.value_type = LAYOUT[name]
        self.fd = libbpf.obj_get(paths.map_pin(name))
        self.percpu = name in PERCPU
        if self.percpu:
            self.ncpus = libbpf.num_possible_cpus()
        try:
            self._check_layout()
        except BaseException:
            self.close()
            raise

    def _check_layout(self):
        info = self.info()
        self.map_type = info.type
        expected = [("key", ctypes.sizeof(self.key_type), info.key_size)]
        if self.value_type is not None:     # sockhash values are the kernel's own
            expected.append(("value", ctypes.sizeof(self.value_type), info.value_size))
        for what, ours, kernels in expected:
            if ours != kernels:
                raise LayoutError(f"map {self.name}: {what} is {kernels} bytes in the loaded datapath, "
                                  f"{ours} in this interceptor: they are different versions "
                                  "(run `interceptor load` with this version)")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value_buf(self):
        if self.percpu:
            return (self.value_type * self.ncpus)()
        return self.value_type()

    def get(self, key):
        value = self._value_buf()
        if not libbpf.map_lookup(self.fd, key, value):
            return None
        return list(value) if self.percpu else value

    def put(self, key, value, flags=libbpf.BPF_ANY):
        try:
            libbpf.map_update(self.fd, key, value, flags)
        except OSError as exc:
            if exc.errno not in (errno.E2BIG, errno.ENOSPC):
                raise
            raise MapFullError(exc.errno, f"map {self.name} is full ({self.info().max_entries} entries): "
                               f"raise it with `interceptor upgrade --map-size {self.name}=N`") from None

    def delete(self, key):
        return libbpf.map_delete(self.fd, key)

    def keys(self):
        return [self.key_type.from_buffer_copy(k) for k, _ in self._raw(values=False)]

    def _raw(self, values=True):
        """Every entry as raw (key bytes, value bytes): a few syscalls where the map type
        has batch operations, one per key (and one per value, unless values is False:
        then b"") elsewhere."""
        whole = self.value_type * self.ncpus if self.percpu else self.value_type
        if self.value_type is not None and self.map_type in libbpf.BATCH_MAP_TYPES:
            ks, vs = ctypes.sizeof(self.key_type), ctypes.sizeof(whole)
            try:
                return [(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])
                        for keys, values, n in libbpf.map_batches(self.fd, ks, vs) for i in range(n)]
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                    raise           # else a kernel before batch operations
        out = []
        for key in libbpf.map_keys(self.fd, self.key_type):
            if not values or self.value_type is None:
                out.append((bytes(key), b""))
                continue
            value = self._value_buf()
            if libbpf.map_lookup(self.fd, key, value):     # else gone meanwhile
                out.append((bytes(key), bytes(value)))
        return out

    def pod_keys(self, cookie, in_value=False):
        """Keys of one pod's entries: maps keyed by a struct with netns_cookie, or, with
        in_value, whose value has one. Compared as bytes: objects are made only for the
        pod's own entries, whatever the map holds."""
        struct = self.value_type if in_value else self.key_type
        off = struct.netns_cookie.offset
        want = ctypes.c_uint64(cookie)
        want = bytes(want)
        return [self.key_type.from_buffer_copy(k) for k, v in self._raw(values=in_value)
                if (v if in_value else k)[off:off + 8] == want]

    def delete_pod_keys(self, cookie, keep=frozenset()):
        """Delete one pod's entries; keep: keys (as bytes) to leave in place."""
        for key in self.pod_keys(cookie):
            if bytes(key) not in keep:
                self.delete(key)

    def items(self):
        whole = self.value_type * self.ncpus if self.percpu else self.value_type
        for k, v in self._raw():
            value = whole.from_buffer_copy(v)
            yield self.key_type.from_buffer_copy(k), list(value) if self.percpu else value

    def info(self):
        return libbpf.obj_info(self.fd, libbpf.MapInfo)


class Maps:
    """Lazily opened pinned maps: `Maps().pods.get(...)`. Raises FileNotFoundError-like
    OSError when the datapath is not loaded."""

    def __init__(self):
        self._open = {}

    def __getattr__(self, name):
        if name not in LAYOUT:
            raise AttributeError(name)
        if name not in self._open:
            self._open[name] = PinnedMap(name)
        return self._open[name]

    def open_all(self):
        """Open every map now, each checked against its layout (LayoutError, OSError);
        closes what it opened when one fails."""
        try:
            for name in LAYOUT:
                getattr(self, name)
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        for m in self._open.values():
            m.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def addr16(ip):
    """ip_address -> abi.Addr16, IPv4 v4-mapped (the datapath's one address shape)."""
    packed = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    return abi.Addr16.from_buffer_copy(packed)


def cidr_key(cookie, kind, net):
    """The LPM key of a CIDR (ip_network) for one pod and list kind: the fixed fields
    always match, then the prefix (v4-mapped, so an IPv4 /n is /96+n)."""
    key = abi.CidrKey(kind=kind, netns_cookie=cookie, addr=addr16(net.network_address))
    prefix = net.prefixlen + (96 if net.version == 4 else 0)
    key.prefixlen = abi.CIDR_KEY_FIXED_BITS + prefix
    return key


def port_key(cookie, kind, port):
    return abi.PortKey(netns_cookie=cookie, port=port, kind=kind)
