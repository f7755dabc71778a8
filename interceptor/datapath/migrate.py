"""Moving a pinned map's entries into a map of another capacity or layout: what an
in-place upgrade (upgrade.py) does for each map that changed, so a node can be resized
(`--map-size`) or take a datapath whose structures grew without unenrolling a pod.

Layouts are matched field by field, by name. The load records every map's layout in the
node state (`layouts()`); an upgrade converts each entry from that record to this
version's layout: a field kept keeps its bytes, a new field starts at zero, an integer
that grew is widened, a dropped value field is dropped. What cannot be converted (a
field that shrank or changed kind, a key that loses a field, so entries could collide)
refuses the upgrade before anything changed.

The copy runs twice. Before the swap, under the node lock, so every entry userspace
writes (pods, addresses, rules, policies) is there when the new programs start. After
the swap, a catch-up: what the old programs wrote meanwhile (live connections'
records, counters) is carried over, without overwriting what the new programs wrote
since. Maps holding sockets or programs cannot be copied from userspace: changing one
needs a reload."""
import ctypes

from interceptor.kernel import libbpf
from interceptor.datapath.maps import COUNTERS, LAYOUT

# Map types whose entries are plain bytes userspace can read and write back.
COPYABLE = {libbpf.MapType.HASH, libbpf.MapType.ARRAY, libbpf.MapType.PERCPU_HASH,
            libbpf.MapType.LRU_HASH, libbpf.MapType.LPM_TRIE}
PERCPU_TYPES = {libbpf.MapType.PERCPU_HASH}
HOLDS_OBJECTS = {libbpf.MapType.SOCKHASH: "sockets", libbpf.MapType.SK_STORAGE: "per-socket storage",
                 libbpf.MapType.PROG_ARRAY: "programs"}


class MigrationError(Exception):
    pass


class Field:
    """One leaf of a flattened key or value: integers are converted by value, byte
    arrays (addresses) only when their size is unchanged."""
    __slots__ = ("name", "offset", "size", "kind")

    def __init__(self, name, offset, size, kind):
        self.name, self.offset, self.size, self.kind = name, offset, size, kind

    def as_json(self):
        return [self.name, self.offset, self.size, self.kind]


class Layout:
    """A key or value's size and fields, as recorded in the node state."""

    def __init__(self, size, fields):
        self.size, self.fields = size, fields

    @classmethod
    def of(cls, ctype):
        if ctype is None:
            return None
        return cls(ctypes.sizeof(ctype), list(_flatten(ctype, "", 0)))

    @classmethod
    def from_json(cls, doc):
        try:
            return cls(int(doc["size"]), [Field(str(n), int(o), int(s), str(k)) for n, o, s, k in doc["fields"]])
        except (TypeError, KeyError, ValueError):
            return None        # a damaged record is an unknown layout, not a crash

    def as_json(self):
        return {"size": self.size, "fields": [f.as_json() for f in self.fields]}


def _flatten(ctype, prefix, base):
    if issubclass(ctype, ctypes.Structure):
        for name, ftype, *_ in ctype._fields_:
            yield from _flatten(ftype, f"{prefix}{name}.", base + getattr(ctype, name).offset)
    elif issubclass(ctype, ctypes.Array):
        yield Field(prefix.rstrip("."), base, ctypes.sizeof(ctype), "bytes")
    else:
        yield Field(prefix.rstrip(".") or "value", base, ctypes.sizeof(ctype), "int")


def layouts():
    """Every map's key and value layout in this version, for the node state."""
    return {name: {"key": Layout.of(k).as_json(), "value": Layout.of(v).as_json() if v else None}
            for name, (k, v) in LAYOUT.items()}


class Conversion:
    """Rewrites one key or value from the loaded datapath's layout (old) to this
    version's (new). old is None when the load did not record it or the record does
    not match the map: the bytes are then copied as they are, if the sizes agree."""

    def __init__(self, what, old, old_size, new, is_key):
        self.what, self.new_size = what, new.size
        if old is None or old.size != old_size:
            if old_size != new.size:
                raise MigrationError(f"{what} changes size ({old_size} -> {new.size} bytes) and the "
                                     "loaded datapath's layout of it is not recorded")
            self.moves = [(0, 0, old_size)]
            return
        if old.size == new.size and [f.as_json() for f in old.fields] == [f.as_json() for f in new.fields]:
            self.moves = [(0, 0, old_size)]       # unchanged: padding copied too
            return
        by_name = {f.name: f for f in old.fields}
        self.moves = []
        for f in new.fields:
            was = by_name.pop(f.name, None)
            if was is None:
                continue                      # new field: starts at zero
            if was.kind != f.kind or was.size > f.size or (f.kind != "int" and was.size != f.size):
                raise MigrationError(f"{what} field {f.name} changes from {was.size} bytes ({was.kind}) "
                                     f"to {f.size} bytes ({f.kind}): its values cannot be carried over")
            self.moves.append((was.offset, f.offset, was.size))    # little-endian: widening pads
        if is_key and by_name:
            raise MigrationError(f"{what} loses field(s) {', '.join(sorted(by_name))}: "
                                 "entries could collide")

    @property
    def identity(self):
        return self.moves == [(0, 0, self.new_size)]

    def __call__(self, raw):
        if self.identity:
            return bytes(raw)
        out = bytearray(self.new_size)
        for old_at, new_at, size in self.moves:
            out[new_at:new_at + size] = raw[old_at:old_at + size]
        return bytes(out)


class MapMigration:
    """One map: the pinned (old) map's entries into the new one the upgrade compiled."""

    def __init__(self, name, old_fd, new_fd, recorded):
        self.name, self.old_fd, self.new_fd = name, old_fd, new_fd
        self.old = libbpf.obj_info(old_fd, libbpf.MapInfo)
        self.new = libbpf.obj_info(new_fd, libbpf.MapInfo)
        if self.old.type != self.new.type:
            raise MigrationError(f"map {name} changes type ({self.old.type} -> {self.new.type})")
        if self.old.type in HOLDS_OBJECTS:
            raise MigrationError(f"map {name} holds {HOLDS_OBJECTS[self.old.type]}, which userspace "
                                 "cannot copy: changing it needs `interceptor unload` and `load`")
        if self.old.type not in COPYABLE:
            raise MigrationError(f"map {name}: type {self.old.type} is not one this version can copy")
        recorded = recorded if isinstance(recorded, dict) else {}
        key_type, value_type = LAYOUT[name]
        self.keys = Conversion(f"map {name}'s key", Layout.from_json(recorded.get("key") or {}),
                               self.old.key_size, Layout.of(key_type), is_key=True)
        self.new_value = Layout.of(value_type)
        self.values = Conversion(f"map {name}'s value", Layout.from_json(recorded.get("value") or {}),
                                 self.old.value_size, self.new_value, is_key=False)
        self.percpu = self.old.type in PERCPU_TYPES
        self.ncpus = libbpf.num_possible_cpus() if self.percpu else 1
        self.counters = name in COUNTERS
        self.snapshot = {}                 # new key -> the value the first pass wrote

    def describe(self):
        changes = [f"{what} {getattr(self.old, what)} -> {getattr(self.new, what)}"
                   for what in ("max_entries", "key_size", "value_size", "map_flags")
                   if getattr(self.old, what) != getattr(self.new, what)]
        return f"{self.name} ({', '.join(changes)}; {len(self.snapshot)} entries)"

    # --- reading and writing raw entries --------------------------------------------
    def _slot(self, size):
        return (size + 7) // 8 * 8 if self.percpu else size

    def _read(self, fd, key_size, value_size):
        """{key bytes: value} where value is bytes, or a tuple of per-CPU bytes."""
        key_type = ctypes.c_char * key_size
        slot = self._slot(value_size)
        out = {}
        for key in libbpf.map_keys(fd, key_type):
            buf = (ctypes.c_char * (slot * self.ncpus))()
            if not libbpf.map_lookup(fd, key, buf):
                continue                   # gone since it was listed
            raw = bytes(buf)
            out[bytes(key)] = tuple(raw[i * slot:i * slot + value_size] for i in range(self.ncpus)) \
                if self.percpu else raw[:value_size]
        return out

    def _read_old(self):
        return {self.keys(k): self._convert(v)
                for k, v in self._read(self.old_fd, self.old.key_size, self.old.value_size).items()}

    def _convert(self, value):
        return tuple(self.values(v) for v in value) if self.percpu else self.values(value)

    def _get_new(self, key):
        slot = self._slot(self.new.value_size)
        buf = (ctypes.c_char * (slot * self.ncpus))()
        if not libbpf.map_lookup(self.new_fd, (ctypes.c_char * len(key)).from_buffer_copy(key), buf):
            return None
        raw = bytes(buf)
        if self.percpu:
            return tuple(raw[i * slot:i * slot + self.new.value_size] for i in range(self.ncpus))
        return raw[:self.new.value_size]

    def _put_new(self, key, value):
        slot = self._slot(self.new.value_size)
        raw = b"".join(v.ljust(slot, b"\0") for v in value) if self.percpu else value
        libbpf.map_update(self.new_fd, (ctypes.c_char * len(key)).from_buffer_copy(key),
                          (ctypes.c_char * len(raw)).from_buffer_copy(raw))

    def _delete_new(self, key):
        libbpf.map_delete(self.new_fd, (ctypes.c_char * len(key)).from_buffer_copy(key))

    # --- the two passes ---------------------------------------------------------------
    def copy(self):
        """Before the swap: every entry, converted. Refused when the new map is too small."""
        entries = self._read_old()
        if self.old.type == libbpf.MapType.ARRAY:
            entries = {k: v for k, v in entries.items()
                       if int.from_bytes(k, "little") < self.new.max_entries}
        elif len(entries) > self.new.max_entries:
            raise MigrationError(f"map {self.name} holds {len(entries)} entries, more than the new "
                                 f"capacity of {self.new.max_entries}")
        for key, value in entries.items():
            try:
                self._put_new(key, value)
            except OSError as exc:
                raise MigrationError(f"map {self.name}: copying an entry failed: {exc}") from None
        self.snapshot = entries

    def catch_up(self):
        """After the swap (the old programs no longer run): carry over what they wrote
        since the copy. Counters add what they counted meanwhile; other entries are
        carried over, or deleted, unless the new programs changed them since."""
        now = self._read_old()
        if self.counters:
            for key, value in now.items():
                grown = self._add(self._get_new(key), value, self.snapshot.get(key))
                if grown is not None:
                    self._put_new(key, grown)
            return
        for key, value in now.items():
            if self.snapshot.get(key) != value and self._get_new(key) == self.snapshot.get(key):
                self._put_new(key, value)
        for key in self.snapshot.keys() - now.keys():
            if self._get_new(key) == self.snapshot[key]:
                self._delete_new(key)

    def _add(self, current, total, copied):
        """current + (total - copied), field by integer field and CPU by CPU."""
        if total == copied:
            return None
        zero = bytes(self.new.value_size)
        per_cpu = zip(current or (zero,) * self.ncpus, total, copied or (zero,) * self.ncpus) \
            if self.percpu else [(current or zero, total, copied or zero)]
        out = []
        for cur, tot, cop in per_cpu:
            value = bytearray(cur)
            for f in self.new_value.fields:
                if f.kind == "int":
                    n = (_int_at(cur, f) + _int_at(tot, f) - _int_at(cop, f)) % (1 << (8 * f.size))
                    value[f.offset:f.offset + f.size] = n.to_bytes(f.size, "little")
            out.append(bytes(value))
        return tuple(out) if self.percpu else out[0]


def _int_at(raw, field):
    return int.from_bytes(raw[field.offset:field.offset + field.size], "little")
