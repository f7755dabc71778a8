"""Hold N idle keep-alive HTTP connections open (run inside a pod by bench/conns.py).

    python -m interceptor.harness.bench.holder HOST FIRST_PORT PORTS N

Opens N connections to HOST, spread over FIRST_PORT .. FIRST_PORT + PORTS - 1 (so the
sidecar -> app leg's 4-tuples do not run out), sends one request on each and reads its
answer, so every connection is established end to end through both sidecars. Then prints
one JSON line ({"held", "failed", "seconds"}) and keeps them open until stdin closes.
Standard library only, non-blocking sockets: a few KiB per connection.
"""
import json
import os
import resource
import selectors
import socket
import sys
import time

IN_FLIGHT = 256                 # connections being opened at once
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
ANSWER_END = b"ok"              # the app's body (topology.APP); its answer ends with it
TIMEOUT_S = 60


def _raise_fd_limit(n):
    want = n + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))


def hold(host, first_port, ports, n):
    _raise_fd_limit(n)
    sel = selectors.DefaultSelector()
    held, failed, started, opened = [], 0, time.monotonic(), 0
    pending = {}                # socket -> bytes read so far (None: still connecting)

    def open_one(i):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, first_port + i % ports))
        pending[s] = None
        sel.register(s, selectors.EVENT_WRITE)

    while len(held) + failed < n:
        while opened < n and len(pending) < IN_FLIGHT:
            open_one(opened)
            opened += 1
        if time.monotonic() - started > TIMEOUT_S * max(1, n // 10_000):
            break
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            try:
                if pending[s] is None:              # connected (or refused)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(REQUEST)
                    pending[s] = b""
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                data = s.recv(4096)
                if not data:
                    raise OSError("closed before the answer")
                pending[s] += data
                if pending[s].endswith(ANSWER_END):
                    sel.unregister(s)
                    del pending[s]
                    held.append(s)
            except OSError:
                sel.unregister(s)
                del pending[s]
                s.close()
                failed += 1
    failed += len(pending)
    print(json.dumps({"held": len(held), "failed": failed,
                      "seconds": round(time.monotonic() - started, 2)}), flush=True)
    sys.stdin.read()            # until the bench closes our stdin
    return held


if __name__ == "__main__":
    hold(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
