"""Watching a directory for changes with inotify (through libc: the standard library has
no binding). Only "something changed in here" matters to its one user, the agent's CNI
chain, which then looks at the whole directory again."""
import os
import select

from . import libc

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080          # rename into place: how aws-vpc-cni writes its config
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | \
    IN_DELETE_SELF | IN_MOVE_SELF


class DirWatch:
    def __init__(self, path):
        self.path = path
        self.fd = libc.call("inotify_init1", "inotify_init1", IN_NONBLOCK | IN_CLOEXEC)
        try:
            libc.call(f"inotify_add_watch {path}", "inotify_add_watch", self.fd,
                      os.fsencode(path), CHANGES)
        except OSError:
            os.close(self.fd)
            raise

    def wait(self, timeout):
        """True when something changed within timeout seconds (events are drained: the
        caller rereads the directory, whatever and however many they were)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        while True:
            try:
                if not os.read(self.fd, 65536):
                    break
            except BlockingIOError:
                break
        return True

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
