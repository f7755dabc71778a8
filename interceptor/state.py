"""Userspace records under /run/interceptor: node state, one file per enrolled pod, and
the lock that serialises load/unload/enroll/unenroll (the CNI runtime runs ADD and DEL
for different containers in parallel)."""
import _thread
import contextlib
import fcntl
import json
import os
import time

from . import paths

_request = _thread._local()     # per thread: the agent serves requests on several


class DeadlinePassed(Exception):
    """The node lock was got after the deadline of the request this thread serves."""


@contextlib.contextmanager
def request_deadline(deadline_ns):
    """Work on this thread is for a request whose sender stops waiting at deadline_ns
    (CLOCK_MONOTONIC) and then does it another way (the plugin's front runs the plugin
    itself). node_lock() refuses to start past it: whoever took over holds the lock or
    had it first, so doing the work now could undo what came after (an ADD after the
    runtime's DEL). Work begun under the lock in time is safe: a takeover waits for it."""
    _request.deadline_ns = deadline_ns
    try:
        yield
    finally:
        _request.deadline_ns = None


@contextlib.contextmanager
def node_lock():
    os.makedirs(paths.RUN_DIR, mode=0o755, exist_ok=True)
    fd = os.open(paths.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        deadline_ns = getattr(_request, "deadline_ns", None)
        if deadline_ns is not None and time.monotonic_ns() > deadline_ns:
            raise DeadlinePassed("the node lock came after the request's deadline")
        yield
    finally:
        os.close(fd)


def write_json(path, data, compact=False):
    """Atomic: readers see the old file or the new one, never half of it. The file is
    created afresh (never through a symlink someone placed) and the rename replaces
    whatever is at path, a symlink included, not what it points to. compact: one line,
    for files written several times on every pod start (json has no C encoder for
    indented output)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    # per process and thread: the node agent answers CNI requests on several threads
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{_thread.get_ident()}")
    remove(tmp)          # a leftover of a killed writer that had this name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        # dumps, not dump: only the one-shot encoder is the C one
        f.write(json.dumps(data, indent=None if compact else 2, sort_keys=True))
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    """None when there is no file; OSError (ELOOP) for a symlink where the file goes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        return json.load(f)


def remove(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def node_plan():
    """The Plan of the current complete load, or None. Read here rather than through
    loader, which the CNI path has no need to import."""
    node = read_node()[0]
    return node.plan if node and node.complete else None


# The node state's fields and their types, as load and upgrade write them. A file that
# does not fit is damaged: treated as no load (the plugin then fails closed, code 11),
# named by status, and removed by `interceptor unload` with everything else.
_OPTIONAL = type(None)
_NODE_FIELDS = {
    "plan": dict, "complete": bool, "requested_mode": str, "bypass": bool,
    "cgroup": (str, _OPTIONAL), "cgroup_mounted_by_us": bool, "datapath_version": (str, _OPTIONAL),
    "host_netns_cookie": int, "map_sizes": dict, "map_layouts": dict, "upgrading_to": (str, _OPTIONAL),
    "migrating_maps": list, "loaded_at": (int, float), "upgraded_at": (int, float),
    "compile_seconds": (int, float),
}


class NodeState:
    """What load and upgrade recorded of the node's datapath (node.json). Fields of a
    newer or older version this one does not know are kept as they were (extra)."""
    __slots__ = ("requested_mode", "plan", "complete", "cgroup", "datapath_version",
                 "host_netns_cookie", "map_sizes", "map_layouts", "upgrading_to", "migrating_maps",
                 "loaded_at", "upgraded_at", "compile_seconds", "extra")

    def __init__(self, requested_mode="auto", plan=None, complete=False, cgroup=None,
                 datapath_version=None, host_netns_cookie=None, map_sizes=None, map_layouts=None,
                 upgrading_to=None, migrating_maps=(), loaded_at=None, upgraded_at=None,
                 compile_seconds=None, extra=None):
        self.requested_mode = requested_mode        # what load was asked for (auto, ebpf, ...)
        self.plan = plan                            # plan.Plan: what it chose (and the bypass switch)
        self.complete = complete                    # every step of the load was done
        self.cgroup = cgroup                        # where the cgroup hooks are attached
        self.datapath_version = datapath_version    # of the loaded programs
        self.host_netns_cookie = host_netns_cookie  # compiled into every program
        self.map_sizes = dict(map_sizes or {})      # {map: capacity} asked for over abi's defaults
        self.map_layouts = dict(map_layouts or {})  # {map: layout} of the pinned maps (migrate.py)
        self.upgrading_to = upgrading_to            # an upgrade's swap began and did not end
        self.migrating_maps = list(migrating_maps)  # ... with these maps staged beside the old
        self.loaded_at, self.upgraded_at = loaded_at, upgraded_at
        self.compile_seconds = compile_seconds
        self.extra = dict(extra or {})

    @property
    def bypass(self):
        """The same-host bypass is switched on (the plan's switch: one fact)."""
        return bool(self.plan and self.plan.bypass)

    def to_json(self):
        doc = dict(self.extra)
        doc["bypass"] = self.bypass        # also at the top, where earlier versions read it
        for name in self.__slots__[:-1]:
            value = getattr(self, name)
            if name == "plan":
                value = value.to_json() if value else None
            if value is not None and not (name in ("upgrading_to", "migrating_maps") and not value):
                doc[name] = value
        doc.setdefault("cgroup", None)
        return doc

    @classmethod
    def from_json(cls, doc):
        """ValueError saying why when the document is not a node state."""
        from .plan import Plan
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        problem = misfit(doc, _NODE_FIELDS, "") or \
            (_plan_problem(doc["plan"]) if isinstance(doc.get("plan"), dict) else None) or \
            (None if not doc.get("complete") or isinstance(doc.get("plan"), dict) else "a complete load without a plan")
        if problem:
            raise ValueError(problem)
        known = {k: v for k, v in doc.items() if k in cls.__slots__ and k != "extra"}
        # "bypass" at the top repeats the plan's (written for earlier versions' readers)
        if known.get("plan") is not None:
            known["plan"] = Plan.from_json(known["plan"])
        return cls(**known, extra={k: v for k, v in doc.items() if k not in cls.__slots__ + ("bypass",)})

    def write(self):
        write_json(paths.NODE_STATE, self.to_json())


def _fits(value, types):
    types = types if isinstance(types, tuple) else (types,)
    return bool in types if isinstance(value, bool) else isinstance(value, types)   # True is an int


def misfit(doc, fields, where=""):
    """The first field of doc whose value is not of its types (fields: {key: type or
    tuple}; True is no int here), as "where.key is T"; None when all fit."""
    for key, types in fields.items():
        if key in doc and not _fits(doc[key], types):
            return f"{where}{key} is {type(doc[key]).__name__}"
    return None


def _plan_problem(doc):
    from .plan import problem
    return problem(doc) or (None if "bypass" in doc else "plan without bypass")


def read_node():
    """(NodeState, problem). None and None when nothing is loaded; None and why when the
    file cannot be used (unreadable, not JSON, fields of the wrong type)."""
    try:
        doc = read_json(paths.NODE_STATE)
    except OSError as exc:
        return None, f"node state {paths.NODE_STATE} is unreadable ({exc.strerror})"
    except ValueError as exc:
        return None, f"node state {paths.NODE_STATE} is not JSON ({str(exc)[:80]})"
    if doc is None:
        return None, None
    try:
        return NodeState.from_json(doc), None
    except ValueError as exc:
        return None, f"node state {paths.NODE_STATE} is damaged ({exc}): `interceptor unload` removes it " \
                     "with everything it described"
