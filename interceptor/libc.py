"""The C library, loaded once, for the few system calls Python's standard library lacks
(setns, mount, umount2, pidfd_getfd), with errors raised as OSError."""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)


def call(what, name, *args):
    """libc's `name`(*args); a negative result is an OSError saying what failed."""
    ret = getattr(_libc, name)(*args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret
