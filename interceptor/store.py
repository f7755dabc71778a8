"""How userspace records under /run/interceptor are kept: JSON files written atomically
and read without following symlinks, type checks of what was read, and the lock that
serialises load/unload/enroll/unenroll (the CNI runtime runs ADD and DEL for different
containers in parallel). What the records hold is their owners' business
(datapath/node_state.py, pod/podrecord.py)."""
import _thread
import contextlib
import fcntl
import json
import os
import time

from interceptor import paths

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
