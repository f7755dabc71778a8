"""A small transparent test proxy for what HAProxy 2.6 cannot show: IPv6 original
destinations (HAProxy reads only the IPv4 SO_ORIGINAL_DST).

    sidecar.py --log FILE [--outbound-port 15001] [--inbound-port 15006] [--uid 1337 --gid 1337]

Listens on both ports for IPv4 and IPv6, drops to the proxy uid/gid after binding, and
for each accepted connection logs one JSON line {listener, peer, orig_dst, how, sockname},
then forwards to the original destination: from SO_ORIGINAL_DST (SOL_IP, or SOL_IPV6
optname 80) when it answers, else from getsockname() (sk_lookup leaves the destination
unchanged, so the accepted socket's own address is the original one).
"""
import argparse
import json
import os
import socket
import struct
import threading

SO_ORIGINAL_DST = 80          # SOL_IP; IP6T_SO_ORIGINAL_DST at SOL_IPV6 has the same number


def original_dst(conn):
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)   # SOL_IPV6
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def handle(conn, listener, log, lock):
    # Non-blocking under the hood, like every event-loop proxy (see apps.py serve()).
    conn.settimeout(300)
    try:
        peer = conn.getpeername()
    except OSError:     # reset before we got to it: still ask and log, as HAProxy does
        peer = ("-", 0)
    sockname = conn.getsockname()[:2]
    # As HAProxy and Envoy do: SO_ORIGINAL_DST first (answered by the datapath, or by
    # conntrack under REDIRECT rules), else the socket's own address (sk_lookup: no NAT).
    try:
        dst, how = original_dst(conn), "so_original_dst"
    except OSError:
        dst, how = sockname, "getsockname"
    with lock:
        log.write(json.dumps({"listener": listener, "peer": f"{peer[0]}:{peer[1]}",
                              "orig_dst": f"{dst[0]}:{dst[1]}", "how": how,
                              "sockname": f"{sockname[0]}:{sockname[1]}"}) + "\n")
        log.flush()
    # Istio's inbound hop comes from 127.0.0.6 / ::6 (which interception leaves alone);
    # from any other address the proxy's connection to its own pod is a self-call, sent
    # back to its inbound port
    source = None
    if listener == "inbound":
        source = ("::6" if ":" in dst[0] else "127.0.0.6", 0)
    try:
        upstream = socket.create_connection(dst[:2], timeout=10, source_address=source)
    except OSError:
        conn.close()
        return
    upstream.settimeout(300)
    t = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
    t.start()
    pipe(conn, upstream)
    t.join()
    conn.close()
    upstream.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--outbound-port", type=int, default=15001)
    ap.add_argument("--inbound-port", type=int, default=15006)
    ap.add_argument("--uid", type=int, default=1337)
    ap.add_argument("--gid", type=int, default=1337)
    args = ap.parse_args()
    listeners = []
    for name, port in (("outbound", args.outbound_port), ("inbound", args.inbound_port)):
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(128)
            listeners.append((s, name))
    log = open(args.log, "a")     # opened before dropping privileges
    os.setgid(args.gid)
    os.setuid(args.uid)
    lock = threading.Lock()

    def accept_loop(s, name):
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handle, args=(conn, name, log, lock), daemon=True).start()

    for s, name in listeners[1:]:
        threading.Thread(target=accept_loop, args=(s, name), daemon=True).start()
    accept_loop(*listeners[0])


if __name__ == "__main__":
    main()
