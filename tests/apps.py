"""The test apps: a server and a client that report what they saw, as JSON.

    apps.py serve PORT            reads each connection to EOF, answers with a JSON report
                                  (its sockname/peername, byte count, sha256), closes
    apps.py connect HOST PORT [--bytes N] [--uid U] [--gid G] [--framed]
                                  sends N random bytes (default: b"hello"), half-closes
                                  (--framed: announces N first instead, see FRAME),
                                  prints {peername, sent_sha256, reply} or {error}
    apps.py stream-checks PORT    see stream_checks(): FIONREAD, splice, half-close, RST
    apps.py backpressure PORT LIMIT    see backpressure(): a receiver that does not read
    apps.py storm HOST PORT N --close fin|rst
                                  N connections, each closed as soon as it is connected
                                  (fin: close(); rst: SO_LINGER 0), as wrk's start-up
                                  probe, health checkers and port scanners do; prints
                                  {connected, failed}
    apps.py load HOST PORT --until FILE
                                  request after request (connect, send, half-close,
                                  read the reply) until FILE exists; prints {ok, failed,
                                  errors, peers}: a load generator that counts every
                                  failure (peers: the server's view of each sockname)
    apps.py http PORT             an HTTP/1.1 server on IPv4 and IPv6: GET answers its
                                  report (peername, sockname, path) as JSON; POST reads
                                  the body and answers ?bytes=N bytes, with the body's
                                  length and sha256 in X-Received / X-Sha256
    apps.py http-get URL [--count N] [--concurrency C] [--timeout S]
                                  N GETs (C at a time, each its own connection): prints
                                  {codes: {status: n}, errors: {text: n}, reports: [...]}

Run inside pod namespaces by the tests (ip netns exec). Standard library only.
"""
import argparse
import errno
import hashlib
import json
import os
import socket
import sys
import threading

CHUNK = 1 << 16


def _addr(sa):
    return f"{sa[0]}:{sa[1]}"


def _listen(port, family, host):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(128)
    return s


def serve(port):
    def handle(conn):
        # A timeout puts the socket in non-blocking mode (Python polls and retries on
        # EAGAIN): see test_blocking_recv_on_a_bypassed_socket_gets_the_data_or_eagain for why that matters.
        conn.settimeout(60)
        with conn:
            h = hashlib.sha256()
            n = 0
            expect = None       # framed: the client said how much it sends (no half-close)
            first = True
            while expect is None or n < expect:
                data = conn.recv(CHUNK)
                if not data:
                    break
                if first and data.startswith(FRAME):
                    while b"\n" not in data:
                        more = conn.recv(CHUNK)
                        if not more:
                            break
                        data += more
                    header, _, data = data.partition(b"\n")
                    expect = int(header[len(FRAME):])
                first = False
                h.update(data)
                n += len(data)
            report = {"sockname": _addr(conn.getsockname()), "peername": _addr(conn.getpeername()),
                      "bytes": n, "sha256": h.hexdigest()}
            conn.sendall(json.dumps(report).encode())

    listeners = [_listen(port, socket.AF_INET, "0.0.0.0"), _listen(port, socket.AF_INET6, "::")]
    print("listening", flush=True)

    def accept_loop(s):
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    for s in listeners[1:]:
        threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
    accept_loop(listeners[0])


# A connection that says how many bytes follow ("IC-LEN 65536\n"): the server answers
# after that many instead of at EOF, so the client need not half-close first. (Envoy's
# listener filters close a connection whose FIN arrives before they are done with it.)
FRAME = b"IC-LEN "


def connect(host, port, nbytes=None, uid=None, gid=None, framed=False):
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect((host, port))
    except OSError as exc:
        return {"error": errno.errorcode.get(exc.errno, str(exc))}
    out = {"peername": _addr(s.getpeername()), "sockname": _addr(s.getsockname())}
    h = hashlib.sha256()
    try:
        if framed:
            s.sendall(FRAME + str(5 if nbytes is None else nbytes).encode() + b"\n")
        if nbytes is None:
            payload = b"hello"
            h.update(payload)
            s.sendall(payload)
        else:
            left = nbytes
            while left:
                chunk = os.urandom(min(CHUNK * 4, left))
                h.update(chunk)
                s.sendall(chunk)
                left -= len(chunk)
        if not framed:
            s.shutdown(socket.SHUT_WR)     # half-close: the server answers after EOF
    except OSError as exc:
        # the peer closed first (a proxy that had nowhere to send the connection)
        out["error"] = errno.errorcode.get(exc.errno, str(exc))
        out["reply"] = None
        s.close()
        return out
    reply = b""
    try:
        while True:
            data = s.recv(CHUNK)
            if not data:
                break
            reply += data
    except OSError as exc:
        out["error"] = errno.errorcode.get(exc.errno, str(exc))
    s.close()
    out["sent_sha256"] = h.hexdigest()
    out["reply"] = json.loads(reply) if reply else None
    return out


def storm(host, port, n, close):
    import struct
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    counts = {"connected": 0, "failed": 0}
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
            counts["connected"] += 1
        except OSError:
            counts["failed"] += 1
        if close == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return counts


def stream_checks(port):
    """Stream semantics over one connection inside a pod (a loopback pair, which the
    bypass short-circuits when on): FIONREAD sees queued bytes, splice() moves them,
    half-close delivers EOF after the data, and a RST is reported as a reset."""
    import fcntl
    import struct
    import termios
    import time

    srv = _listen(port, socket.AF_INET, "127.0.0.1")
    result = {}
    cli = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn, _ = srv.accept()
    conn.settimeout(10)

    # FIONREAD: bytes sent by the peer are counted before they are read.
    cli.sendall(b"x" * 1000)
    deadline = time.monotonic() + 5
    queued = 0
    while time.monotonic() < deadline and queued < 1000:
        queued = struct.unpack("i", fcntl.ioctl(conn, termios.FIONREAD, b"\0\0\0\0"))[0]
        time.sleep(0.01)
    result["fionread"] = queued
    assert conn.recv(2000) == b"x" * 1000

    # splice(): from the socket into a pipe, as nginx/HAProxy do.
    cli.sendall(b"y" * 4096)
    r, w = os.pipe()
    moved = 0
    deadline = time.monotonic() + 5
    conn.setblocking(False)
    while moved < 4096 and time.monotonic() < deadline:
        try:
            moved += os.splice(conn.fileno(), w, 4096 - moved)
        except BlockingIOError:
            time.sleep(0.01)
    conn.setblocking(True)
    conn.settimeout(10)
    result["splice"] = moved
    result["splice_data_ok"] = moved > 0 and os.read(r, 8192) == b"y" * moved
    if moved < 4096:   # drain what splice could not see, to go on with the checks
        conn.recv(4096 - moved)
    os.close(r)
    os.close(w)

    # half-close: data then EOF, and the other direction still works.
    cli.sendall(b"last words")
    cli.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = conn.recv(100)
        if not d:
            break
        got += d
    result["half_close_data"] = got.decode()
    conn.sendall(b"reply after half-close")
    result["reply_after_half_close"] = cli.recv(100).decode()

    # RST: the server aborts (SO_LINGER 0); the client sees a reset, not a clean EOF.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    try:
        time.sleep(0.1)
        cli.sendall(b"after reset")
        time.sleep(0.1)
        data = cli.recv(100)
        result["after_rst"] = "eof" if data == b"" else "data"
    except ConnectionResetError:
        result["after_rst"] = "reset"
    except BrokenPipeError:
        result["after_rst"] = "reset"
    cli.close()
    srv.close()
    return result


def backpressure(port, limit):
    """A loopback pair whose receiver does not read: how much a non-blocking sender can
    queue before send() stops, and how it stops (over TCP: EAGAIN once the two socket
    buffers are full). Drained after, so nothing stays queued."""
    import errno
    srv = _listen(port, socket.AF_INET, "127.0.0.1")
    cli = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn, _ = srv.accept()
    cli.setblocking(False)
    chunk = b"q" * 65536
    queued, stop = 0, "limit"
    while queued < limit:
        try:
            queued += cli.send(chunk)
        except BlockingIOError:
            stop = "EAGAIN"
            break
        except OSError as exc:
            stop = errno.errorcode.get(exc.errno, str(exc.errno))
            break
    conn.setblocking(False)
    drained = 0
    while True:
        try:
            data = conn.recv(1 << 20)
        except BlockingIOError:
            break
        if not data:
            break
        drained += len(data)
    cli.close()
    conn.close()
    srv.close()
    return {"queued": queued, "stop": stop, "drained": drained}


def load(host, port, until):
    import time
    out = {"ok": 0, "failed": 0, "errors": {}, "sent_to": set()}
    while not os.path.exists(until):
        r = connect(host, port)
        reply = r.get("reply")
        if "error" in r or not reply or reply.get("bytes") != 5:
            out["failed"] += 1
            key = r.get("error", "bad reply")
            out["errors"][key] = out["errors"].get(key, 0) + 1
            time.sleep(0.01)
        else:
            out["ok"] += 1
            out["sent_to"].add(reply["sockname"])
    out["sent_to"] = sorted(out["sent_to"])
    return out


def http_serve(port):
    import http.server
    import socketserver
    from urllib.parse import parse_qs, urlparse

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, body, headers=()):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            report = {"peername": _addr(self.connection.getpeername()),
                      "sockname": _addr(self.connection.getsockname()), "path": self.path}
            self._answer(json.dumps(report).encode())

        def do_POST(self):
            left = int(self.headers.get("Content-Length", 0))
            h, n = hashlib.sha256(), 0
            while left:
                data = self.rfile.read(min(CHUNK, left))
                if not data:
                    break
                h.update(data)
                n += len(data)
                left -= len(data)
            want = int(parse_qs(urlparse(self.path).query).get("bytes", ["0"])[0])
            self._answer(os.urandom(want), [("X-Received", str(n)), ("X-Sha256", h.hexdigest())])

    class V4(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 512

    class V6(V4):
        address_family = socket.AF_INET6

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()

    servers = [V4(("0.0.0.0", port), Handler), V6(("::", port), Handler)]
    print("listening", flush=True)
    threading.Thread(target=servers[1].serve_forever, daemon=True).start()
    servers[0].serve_forever()


def _http_once(url, timeout):
    """One GET on a connection of its own: (status, error name, the server's report)."""
    import http.client
    from urllib.parse import urlparse
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", u.path or "/", headers={"Host": u.netloc})
        r = conn.getresponse()
        body = r.read()
        try:
            report = json.loads(body)
        except ValueError:
            report = body.decode(errors="replace")[:200]
        return r.status, None, report
    except (OSError, http.client.HTTPException) as exc:
        return None, errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__), None
    finally:
        conn.close()


def http_get(url, count=1, concurrency=1, timeout=30):
    from concurrent.futures import ThreadPoolExecutor
    out = {"codes": {}, "errors": {}, "reports": []}
    with ThreadPoolExecutor(concurrency) as pool:
        for status, error, report in pool.map(lambda _: _http_once(url, timeout), range(count)):
            if status is not None:
                out["codes"][str(status)] = out["codes"].get(str(status), 0) + 1
                out["reports"].append(report)
            else:
                out["errors"][error] = out["errors"].get(error, 0) + 1
    return out


def http_load(urls, until):
    """GETs, each on a new connection, round robin over urls until the file `until`
    exists: per url, how many answered 200 and which peers the server saw, and what
    failed and how."""
    import time
    out = {u: {"ok": 0, "failed": 0, "errors": {}, "peers": set()} for u in urls}
    while not os.path.exists(until):
        for u in urls:
            status, error, report = _http_once(u, timeout=10)
            o = out[u]
            if status == 200 and isinstance(report, dict):
                o["ok"] += 1
                o["peers"].add(report["peername"].rsplit(":", 1)[0])
            else:
                o["failed"] += 1
                key = error or f"HTTP {status}"
                o["errors"][key] = o["errors"].get(key, 0) + 1
                time.sleep(0.01)
    for o in out.values():
        o["peers"] = sorted(o["peers"])
    return out


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("port", type=int)
    p = sub.add_parser("connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int)
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--framed", action="store_true")
    p = sub.add_parser("stream-checks")
    p.add_argument("port", type=int)
    p = sub.add_parser("backpressure")
    p.add_argument("port", type=int)
    p.add_argument("limit", type=int)
    p = sub.add_parser("storm")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("n", type=int)
    p.add_argument("--close", choices=("fin", "rst"), default="fin")
    p = sub.add_parser("load")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--until", required=True)
    p = sub.add_parser("http")
    p.add_argument("port", type=int)
    p = sub.add_parser("http-load")
    p.add_argument("urls", nargs="+")
    p.add_argument("--until", required=True)
    p = sub.add_parser("http-get")
    p.add_argument("url")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    if args.cmd == "http":
        http_serve(args.port)
    elif args.cmd == "http-load":
        print(json.dumps(http_load(args.urls, args.until)))
    elif args.cmd == "http-get":
        print(json.dumps(http_get(args.url, args.count, args.concurrency, args.timeout)))
    elif args.cmd == "serve":
        serve(args.port)
    elif args.cmd == "connect":
        print(json.dumps(connect(args.host, args.port, args.bytes, args.uid, args.gid, args.framed)))
    elif args.cmd == "load":
        print(json.dumps(load(args.host, args.port, args.until)))
    elif args.cmd == "backpressure":
        print(json.dumps(backpressure(args.port, args.limit)))
    elif args.cmd == "storm":
        print(json.dumps(storm(args.host, args.port, args.n, args.close)))
    else:
        print(json.dumps(stream_checks(args.port)))


if __name__ == "__main__":
    sys.exit(main())
