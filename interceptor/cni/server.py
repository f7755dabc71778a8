"""The node agent's end of the plugin's front (cni/front.c): CNI requests answered in the
agent's process, where Python and the plugin's modules are already loaded.

The front forwards the request's CNI_* and INTERCEPTOR_* environment and its stdin over
a unix socket in the run dir (root only: mode 0600, and the peer's uid is checked); each
connection is served on its own thread by the same code the plugin runs on its own
(cni.run). A request for another pin root or run dir than the agent's is answered "not
mine", and the front answers it as it does whenever the agent cannot answer at all.
"""
import collections
import io
import json
import os
import socket
import struct
import threading
import time

from interceptor import paths, store
from interceptor.cni import plugin as cni

SOCKET_NAME = "cni.sock"              # cni/front.c is built with the same name
MAGIC = b"ICNI2\n"
# A request is begun only this long before the front's deadline at the latest: past it
# the front has answered without us (ADD: error 11, DEL: success), and a request carried
# out after that could undo what the runtime did next (an ADD after its DEL).
DEADLINE_MARGIN_NS = 500_000_000
ANSWERED, NOT_MINE = 0, 1
MAX_REQUEST = 64 << 20
READ_TIMEOUT_S = 10                   # a front that sends half a request is dropped
_U32 = struct.Struct("<I")


def socket_path():
    return os.path.join(paths.RUN_DIR, SOCKET_NAME)


def remove_stale_temporaries(everyone=False):
    """Sockets an agent bound under its temporary name (cni.sock.<pid>) and was killed
    before renaming: those of processes gone (everyone: all of them, for uninstall)."""
    prefix = SOCKET_NAME + "."
    for name in paths.listdir(paths.RUN_DIR):
        if not (name.startswith(prefix) and name[len(prefix):].isdigit()):
            continue
        pid = int(name[len(prefix):])
        if not everyone and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue            # its agent is still starting
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        try:
            os.unlink(os.path.join(paths.RUN_DIR, name))
        except FileNotFoundError:
            pass


class BadRequest(Exception):
    pass


def decode(data):
    """(deadline, environ, stdin bytes) from a request's bytes; deadline: CLOCK_MONOTONIC
    ns after which the front no longer waits."""
    if not data.startswith(MAGIC):
        raise BadRequest("not a request of the plugin's front")
    off = len(MAGIC)

    def u32():
        nonlocal off
        if off + 4 > len(data):
            raise BadRequest("request cut short")
        (v,) = _U32.unpack_from(data, off)
        off += 4
        return v

    def chunk():
        nonlocal off
        n = u32()
        if off + n > len(data):
            raise BadRequest("request cut short")
        off += n
        return data[off - n:off]

    deadline = u32() | u32() << 32
    environ = {}
    for _ in range(u32()):
        name, sep, value = chunk().decode("utf-8", "surrogateescape").partition("=")
        if sep and (name.startswith("CNI_") or name.startswith("INTERCEPTOR_")):
            environ[name] = value
    stdin = chunk()
    if off != len(data):
        raise BadRequest("trailing bytes after the request")
    return deadline, environ, stdin


def encode_reply(status, code=0, stdout=b"", stderr=b""):
    return _U32.pack(status) + _U32.pack(code & 0xFFFFFFFF) + _U32.pack(len(stdout)) + stdout + \
        _U32.pack(len(stderr)) + stderr


def mine(environ, configuration):
    """The request resolves to this process's pin root and run dir (a configuration
    that does not decode is answered here: its error is the same anywhere)."""
    pin_root, run_dir = cni.locations(environ, configuration.as_dict)
    return pin_root == paths.PIN_ROOT and run_dir == paths.RUN_DIR


class CniServer:
    """Serves the front until close(). counts: requests by (command, how answered)."""

    def __init__(self, log=print):
        self.log = log
        self.path = socket_path()
        self.counts = collections.Counter()
        self._lock = threading.Lock()
        self._sock = None
        self._inode = None

    def start(self):
        if self._sock is not None:
            return self
        os.makedirs(paths.RUN_DIR, mode=0o755, exist_ok=True)
        remove_stale_temporaries()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        tmp = f"{self.path}.{os.getpid()}"
        # bound under a temporary name with its mode set, then renamed into place: the
        # socket is never reachable with a wider mode, and a running peer's socket is
        # replaced in one step (a restarted agent takes over from the old one)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.replace(tmp, self.path)
        self._inode = os.stat(self.path).st_ino
        self._sock = sock
        threading.Thread(target=self._accept, name="cni-server", daemon=True).start()
        return self

    def healthy(self):
        """Serving, and the socket file still the one it listens on."""
        try:
            return self._sock is not None and os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            return False

    def snapshot(self):
        with self._lock:
            return dict(self.counts)

    def close(self):
        """Stop serving; the socket file goes only if it is still ours (an agent that
        replaced us keeps its own)."""
        if self._sock is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock.close()
        self._sock = None

    def _accept(self):
        sock = self._sock
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return          # closed
            threading.Thread(target=self._serve, args=(conn,), name="cni-request", daemon=True).start()

    def _count(self, command, how):
        with self._lock:
            self.counts[(command, how)] += 1

    def _serve(self, conn):
        command = "?"
        try:
            with conn:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
                if uid != 0:
                    self._count(command, "refused")
                    return
                conn.settimeout(READ_TIMEOUT_S)
                data = _read_all(conn)
                deadline, environ, stdin = decode(data)
                command = environ.get("CNI_COMMAND", "?") if environ.get("CNI_COMMAND") in cni.COMMANDS else "?"
                if time.monotonic_ns() > deadline - DEADLINE_MARGIN_NS:
                    self._count(command, "expired")     # the front answered it itself
                    return
                configuration = cni.Configuration(stdin)      # decoded once for all below
                if not mine(environ, configuration):
                    conn.sendall(encode_reply(NOT_MINE))
                    self._count(command, "not_mine")
                    return
                err = io.StringIO()
                try:
                    with store.request_deadline(deadline - DEADLINE_MARGIN_NS):
                        code, doc = cni.run(environ, stdin, err=err, fixed_locations=True,
                                            configuration=configuration)
                except store.DeadlinePassed:
                    self._count(command, "expired")     # stalled at the node lock
                    return
                out = (json.dumps(doc) + "\n").encode() if doc is not None else b""
                conn.sendall(encode_reply(ANSWERED, code, out,
                                          err.getvalue().encode("utf-8", "backslashreplace")))
                self._count(command, "answered")
        except (OSError, BadRequest) as exc:
            # the front answers without us when it gets no answer
            self._count(command, "failed")
            self.log(f"cni server: {command}: {exc}")


def _read_all(conn):
    parts, size = [], 0
    while True:
        part = conn.recv(65536)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > MAX_REQUEST:
            raise BadRequest(f"request over {MAX_REQUEST} bytes")
        parts.append(part)
