"""The C library, loaded once, for the few system calls Python's standard library lacks
(setns, mount, umount2, pidfd_getfd, membarrier), with errors raised as OSError."""
import ctypes
import os
import platform
import time

_libc = ctypes.CDLL(None, use_errno=True)


def call(what, name, *args):
    """libc's `name`(*args); a negative result is an OSError saying what failed."""
    ret = getattr(_libc, name)(*args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(platform.machine())
_MEMBARRIER_CMD_GLOBAL = 1


def wait_for_running_bpf_programs():
    """Return once every BPF program run that began before this call has ended.
    Programs run inside RCU read-side sections, and membarrier(MEMBARRIER_CMD_GLOBAL) is
    synchronize_rcu(): it returns after every such section begun before it. Where it is
    refused (nohz_full CPUs, another architecture) a grace period is waited out as a
    few tens of milliseconds, which is what one takes on a node that is not stalled."""
    try:
        if _SYS_MEMBARRIER is None:
            raise OSError("membarrier: no syscall number for this architecture")
        call("membarrier", "syscall", _SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0)
    except OSError:
        time.sleep(0.1)
