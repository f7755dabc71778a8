"""bpffs and cgroup2: find them, mount them when the node has none."""
import os

from interceptor import paths
from interceptor.kernel import libc

def _mounts():
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype, *_ = line.split()
            yield dev, mnt.replace("\\040", " "), fstype


def find(fstype):
    """First mount point of fstype, or None."""
    for _, mnt, fs in _mounts():
        if fs == fstype:
            return mnt
    return None


def is_mounted(path, fstype):
    return any(m == str(path) and fs == fstype for _, m, fs in _mounts())


def _mount(fstype, target):
    os.makedirs(target, exist_ok=True)
    libc.call(f"mount -t {fstype} {target}", "mount", fstype.encode(), str(target).encode(),
              fstype.encode(), 0, None)


def ensure_bpffs():
    if not is_mounted(paths.BPFFS, "bpf"):
        _mount("bpf", paths.BPFFS)
    return paths.BPFFS


def ensure_cgroup2():
    """cgroup v2 is one hierarchy: any existing mount is the same tree, so reuse it and
    mount our own only when there is none. Returns (path, mounted_by_us)."""
    existing = find("cgroup2")
    if existing:
        return existing, False
    _mount("cgroup2", paths.OWN_CGROUP2)
    return paths.OWN_CGROUP2, True


def release_own_cgroup2():
    """Unmount the cgroup2 mount we made, if it is still there (a lazy detach: other
    users of the same hierarchy are unaffected)."""
    if is_mounted(paths.OWN_CGROUP2, "cgroup2"):
        MNT_DETACH = 2
        libc.call(f"umount {paths.OWN_CGROUP2}", "umount2", paths.OWN_CGROUP2.encode(), MNT_DETACH)
    try:
        os.rmdir(paths.OWN_CGROUP2)
    except FileNotFoundError:
        pass
