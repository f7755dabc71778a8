"""The two ends of the Istio parity probes (tests/istio_parity.py), run inside network
namespaces by the harness. Standard library only.

    parity_probe.py [--uid U --gid G] listen TAG [PORT...] [--udp PORT,...] --out FILE
        listens on every PORT (TCP) and every --udp PORT, IPv4 and IPv6, and writes one
        JSON line per accepted connection: {tag, port, peer, local, orig}; orig is what a
        proxy would take as the original destination (SO_ORIGINAL_DST, else the socket's
        own address, as under TPROXY or sk_lookup). A datagram is answered with
        {tag, port}. Runs until killed.
    parity_probe.py --uid U --gid G connect [--groups G,...] [--mark M] < targets
        drops to that owner, then probes every "PROTO HOST PORT SOURCE-PORT" line of stdin at once
        (non-blocking, 2 s for all of them) and prints one JSON line with a result per
        target. tcp: a connect; its socket's own address when it connected, else the
        error's name. udp / udpc: a datagram sent with sendto() / on a connected socket
        (as the C library's resolver does); the answer and the address it came from, as
        the app sees it. The sockets stay open until all are done, so no two share a
        local port.
"""
import argparse
import errno
import json
import os
import selectors
import socket
import struct
import sys
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)     # <linux/in.h>; not in every Python
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
TPROXY_PORT = 15006          # the inbound port, transparent as Envoy's is under TPROXY
SO_ORIGINAL_DST = 80          # SOL_IP; IP6T_SO_ORIGINAL_DST at SOL_IPV6 has the same number


def _addr(sa):
    return f"{sa[0]}|{sa[1]}"


def original_destination(conn):
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, = struct.unpack_from("!H", raw, 2)
            return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}|{port}"
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, = struct.unpack_from("!H", raw, 2)
        return f"{socket.inet_ntop(socket.AF_INET6, raw[8:24])}|{port}"
    except OSError:
        return _addr(conn.getsockname())


def answer(sock, reply):
    """Answer a datagram from the address it was sent to (as a DNS server bound to a
    wildcard address must: a connected client takes answers only from its peer)."""
    try:
        _, ancdata, _, peer = sock.recvmsg(512, 256)
        sock.sendmsg([reply], [(level, kind, data) for level, kind, data in ancdata
                               if kind in (IP_PKTINFO, socket.IPV6_PKTINFO)], 0, peer)
    except OSError:
        pass


def listen(tag, ports, udp_ports, log):
    sel = selectors.DefaultSelector()
    for port in udp_ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            s.bind((host, port))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, ("udp", port))
    for port in ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == TPROXY_PORT:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            s.bind((host, port))
            s.listen(4096)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, port)
    with log:
        log.write(json.dumps({"ready": tag}) + "\n")
        while True:
            for key, _ in sel.select():
                if isinstance(key.data, tuple):
                    answer(key.fileobj, json.dumps({"tag": tag, "port": key.data[1]}).encode())
                    continue
                try:
                    conn, peer = key.fileobj.accept()
                except OSError:
                    continue
                with conn:
                    log.write(json.dumps({"tag": tag, "port": key.data, "peer": _addr(peer),
                                          "local": _addr(conn.getsockname()),
                                          "orig": original_destination(conn)}) + "\n")


def connect(uid, gid, groups, targets, mark=None):
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    pending = {}
    results = [None] * len(targets)
    sel = selectors.DefaultSelector()
    for i, (proto, host, port, source_port) in enumerate(targets):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.setblocking(False)
        if mark is not None:            # SO_MARK needs CAP_NET_ADMIN: a root owner
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        try:
            # a port of its own for every probe of a run: a port used again would meet
            # the earlier connection's conntrack entry where it is NATed, and be renamed
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
            if proto == "tcp":
                err = s.connect_ex((host, port))
            elif proto == "udpc":
                s.connect((host, port))
                s.send(b"probe")
                err = errno.EINPROGRESS
            else:
                s.sendto(b"probe", (host, port))
                err = errno.EINPROGRESS
        except OSError as exc:
            err = exc.errno
        if err in (0, errno.EINPROGRESS):
            pending[s] = i
            sel.register(s, selectors.EVENT_WRITE if proto == "tcp" else selectors.EVENT_READ)
        else:
            results[i] = {"error": errno.errorcode.get(err, str(err))}
            s.close()
    opened = list(pending)
    deadline = time.monotonic() + 2
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            sel.unregister(s)
            i = pending.pop(s)
            if s.type == socket.SOCK_DGRAM:
                try:
                    data, source = s.recvfrom(512)
                    results[i] = {"answer": json.loads(data), "from": _addr(source)}
                except OSError as exc:
                    results[i] = {"error": errno.errorcode.get(exc.errno, str(exc.errno))}
                continue
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            results[i] = ({"local": _addr(s.getsockname())} if err == 0 else
                          {"error": errno.errorcode.get(err, str(err))})
    for i in pending.values():
        results[i] = {"error": "TIMEOUT"}
    print(json.dumps(results))
    sys.stdout.flush()
    for s in opened:
        s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("listen")
    ls.add_argument("tag")
    ls.add_argument("ports", nargs="*", type=int)
    ls.add_argument("--udp", default="")
    ls.add_argument("--out", required=True)
    c = sub.add_parser("connect")
    c.add_argument("--groups", default="")
    c.add_argument("--mark", type=lambda v: int(v, 0))
    args = p.parse_args()
    if args.cmd == "listen":
        log = open(args.out, "a", buffering=1)      # opened before dropping to the owner
        if args.uid is not None:
            os.setgroups([])
            os.setgid(args.gid)
            os.setuid(args.uid)
        listen(args.tag, args.ports, [int(p) for p in args.udp.split(",") if p], log)
    else:
        targets = [(proto, h, int(port), int(source)) for proto, h, port, source in
                   (line.split() for line in sys.stdin if line.strip())]
        groups = [int(g) for g in args.groups.split(",") if g]
        connect(args.uid, args.gid, groups, targets, args.mark)


if __name__ == "__main__":
    main()
