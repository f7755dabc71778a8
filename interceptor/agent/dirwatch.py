"""Watching a directory for changes with inotify (through libc: the standard library has
no binding). Only "something changed in here" matters to its one user, the agent's CNI
chain, which then looks at the whole directory again."""
import os
import select
import struct

from interceptor.kernel import libc

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080          # rename into place: how aws-vpc-cni writes its config
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000          # the kernel dropped the watch (its inode is gone)
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("=iIII")     # wd, mask, cookie, len
CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | \
    IN_DELETE_SELF | IN_MOVE_SELF


class DirWatch:
    def __init__(self, path):
        self.path = path
        self.gone = False         # the watched directory itself was removed or moved
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
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            i = 0
            while i + _EVENT.size <= len(data):     # struct inotify_event, then its name
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, i)
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    self.gone = True
                i += _EVENT.size + length
        return True

    def stale(self):
        """The directory watched was removed or moved away (a watch follows the inode,
        so a directory made again under the same path is not watched)."""
        return self.gone

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
