"""Userspace records under /run/interceptor: node state, one file per enrolled pod, and
the lock that serialises load/unload/enroll/unenroll (the CNI runtime runs ADD and DEL
for different containers in parallel)."""
import contextlib
import fcntl
import json
import os

from . import paths


@contextlib.contextmanager
def node_lock():
    os.makedirs(paths.RUN_DIR, mode=0o755, exist_ok=True)
    fd = os.open(paths.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json(path, data):
    """Atomic: readers see the old file or the new one, never half of it. The file is
    created afresh (never through a symlink someone placed) and the rename replaces
    whatever is at path, a symlink included, not what it points to."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    remove(tmp)          # a leftover of a killed writer that had this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
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
    """The plan of the current complete load (see capabilities.plan), or None. Read here
    rather than through loader, which the CNI path has no need to import."""
    node = read_json(paths.NODE_STATE) or {}
    return node.get("plan") if node.get("complete") else None
