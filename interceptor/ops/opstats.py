"""Counters of userspace operations (enroll, unenroll, CNI commands), kept in a small
JSON file under the run dir so that every process (CLI, CNI plugin) adds to the same
numbers and `interceptor metrics` can serve them. Standard library only: the CNI plugin
records its own duration on every call."""
import fcntl
import json
import os

from interceptor import paths

# Seconds; chosen around the CNI targets (VERSION < 30 ms, ADD < 50 ms).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _path():
    return paths.OPSTATS


def record(operation, ok, seconds=None):
    """Count one operation ("enroll", "unenroll", "cni ADD", ...). Never raises: losing
    a counter must not fail a pod."""
    try:
        os.makedirs(paths.RUN_DIR, exist_ok=True)
        fd = os.open(_path(), os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            raw = f.read()
            data = json.loads(raw) if raw.strip() else {}
            entry = data.setdefault(operation, {"ok": 0, "failed": 0})
            entry["ok" if ok else "failed"] += 1
            if seconds is not None:
                hist = entry.setdefault("duration", {"count": 0, "sum": 0.0,
                                                     "buckets": [0] * len(DURATION_BUCKETS)})
                hist["count"] += 1
                hist["sum"] += seconds
                for i, bound in enumerate(DURATION_BUCKETS):
                    if seconds <= bound:
                        hist["buckets"][i] += 1
            f.seek(0)
            f.truncate()
            f.write(json.dumps(data))     # dumps: the C encoder
    except (OSError, ValueError):
        pass


def read():
    try:
        with open(_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
