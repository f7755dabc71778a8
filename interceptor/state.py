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
    paths.RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json(path, data):
    """Atomic: readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def remove(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def pod_records():
    """All enrolled pods' records, by cookie."""
    out = {}
    if paths.POD_STATE.is_dir():
        for f in sorted(paths.POD_STATE.glob("*.json")):
            rec = read_json(f)
            if rec is not None:
                out[int(f.stem)] = rec
    return out
