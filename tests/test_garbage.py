"""Host safety whatever the maps hold: random bytes written into every map userspace can
write (the host's own netns cookie and addresses among them) while the host makes
connections. The host's traffic is never redirected, the kernel logs nothing, status
names problems instead of crashing, and unload still removes everything."""
import ctypes
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (Background, client, enroll, loaded, publish_figures, sidecar_entries, start_server,
                      start_sidecar)
from interceptor import paths
from interceptor.kernel import libbpf, netns
from interceptor.datapath.maps import LAYOUT
from interceptor.datapath.migrate import COPYABLE, PERCPU_TYPES, Layout
from interceptor.ops import status

pytestmark = pytest.mark.kernel
ENTRIES_PER_MAP = 300
KERNEL_TROUBLE = re.compile(r"WARNING|BUG|Call Trace|bpf|general protection", re.I)


def kernel_log():
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def host_addresses():
    """Addresses the host's own connections go to: loopback, both families."""
    return [("127.0.0.1", socket.AF_INET), ("127.0.0.2", socket.AF_INET), ("::1", socket.AF_INET6)]


def garbage_entry(rng, name, info, host_cookie):
    """Random key and value bytes for one map; a third of them carry the host's cookie
    (or address) where the layout has one, the likeliest garbage to be dangerous."""
    key = bytearray(rng.randbytes(info.key_size))
    layout = Layout.of(LAYOUT[name][0])
    for field in layout.fields:
        if field.name in ("netns_cookie", "value") and field.size == 8 and rng.random() < 0.33:
            key[field.offset:field.offset + 8] = host_cookie.to_bytes(8, "little")
        if field.name == "addr" and rng.random() < 0.33:
            host = rng.choice([b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1]), b"\0" * 15 + b"\1"])
            key[field.offset:field.offset + 16] = host
        if field.name == "prefixlen":         # the trie refuses longer prefixes than its key
            key[field.offset:field.offset + 4] = rng.randrange((info.key_size - 4) * 8 + 1).to_bytes(4, "little")
    if info.type == libbpf.MapType.ARRAY:
        key = rng.randrange(info.max_entries).to_bytes(4, "little")
    slots = libbpf.num_possible_cpus() if info.type in PERCPU_TYPES else 1
    slot = (info.value_size + 7) // 8 * 8 if slots > 1 else info.value_size
    return bytes(key), rng.randbytes(slot * slots)


def write_garbage(rng, host_cookie):
    written = {}
    for name in LAYOUT:
        fd = libbpf.obj_get(paths.map_pin(name))
        try:
            info = libbpf.obj_info(fd, libbpf.MapInfo)
            if info.type not in COPYABLE:      # sockets, programs, per-socket storage
                continue
            n = 0
            for _ in range(ENTRIES_PER_MAP):
                key, value = garbage_entry(rng, name, info, host_cookie)
                try:
                    libbpf.map_update(fd, (ctypes.c_char * len(key)).from_buffer_copy(key),
                                      (ctypes.c_char * len(value)).from_buffer_copy(value))
                    n += 1
                except OSError:
                    pass                       # full, or a key the map refuses: fine
            written[name] = n
        finally:
            os.close(fd)
    return written


HOST_CONNECTIONS = 100


class HostClient(Background):
    """Connections from the host to host servers, one after another, each checked: the
    peer is the address dialled and the echo comes back from the server dialled."""

    def __init__(self):
        super().__init__()
        self.servers = []
        for host, family in host_addresses():
            srv = socket.socket(family)
            srv.bind((host, 0))
            srv.listen(64)
            self.servers.append((srv, host, srv.getsockname()[1], family))
        self.ok, self.wrong = 0, []
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s, *_ in self.servers]
        self.threads.append(threading.Thread(target=self._connect))

    def _serve(self, srv):
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(64) + f"|{conn.getsockname()[1]}".encode())

    def _connect(self):
        i = 0
        while not self.stop.is_set():
            _, host, port, family = self.servers[i % len(self.servers)]
            i += 1
            try:
                with socket.socket(family) as c:
                    c.settimeout(5)
                    c.connect((host, port))
                    peer = c.getpeername()[:2]
                    c.sendall(b"ping")
                    reply = c.recv(64)
                if peer != (host, port) or reply != f"ping|{port}".encode():
                    self.wrong.append((host, port, peer, reply))
                else:
                    self.ok += 1
            except OSError as exc:
                self.wrong.append((host, port, repr(exc)))

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for srv, *_ in self.servers:
            srv.close()


def test_garbage_in_every_map_never_touches_the_host(lab):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    log_before = len(kernel_log())
    with loaded():
        # the hooks are live: an enrolled pod's connection is intercepted in this same load
        a, b = lab.add_pod("a"), lab.add_pod("b")
        start_server(b)
        log = start_sidecar(lab, a)
        enroll(a)
        assert client(a, b.ipv4)["reply"]["bytes"] == 5 and len(sidecar_entries(log)) == 1
        host_cookie = netns.host_cookie()
        with HostClient() as host:
            written = {}
            for _ in range(3):             # several waves: entries replaced while in use
                for name, n in write_garbage(rng, host_cookie).items():
                    written[name] = written.get(name, 0) + n
            # with the garbage in place, enough host connections to mean something
            # (counted, not timed: how many fit in the waves depends on the machine)
            deadline = time.monotonic() + 120
            while host.ok < HOST_CONNECTIONS and not host.wrong and time.monotonic() < deadline:
                time.sleep(0.05)
        report = status.collect()          # names what it finds; never a crash
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "status", "-o", "json"],
                           capture_output=True, text=True)
        assert "Traceback" not in r.stderr and json.loads(r.stdout)
    new_log = [line for line in kernel_log()[log_before:] if KERNEL_TROUBLE.search(line)]
    print(f"garbage: {sum(written.values())} entries in {len(written)} maps; host connections "
          f"{host.ok} ok, {len(host.wrong)} wrong; status errors {len(report['errors'])}")
    publish_figures({"scenario": "garbage", "tried": {"entries written": sum(written.values()),
                                              "maps": len(written), "host connections": host.ok},
              "failures": len(host.wrong) + len(new_log)})
    assert host.ok >= HOST_CONNECTIONS and not host.wrong, host.wrong[:5]
    assert not new_log, new_log
    assert len(written) >= 10 and all(n > 0 for n in written.values()), written

