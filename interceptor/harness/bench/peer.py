"""The cross-node scenario across two machines: `bench --serve` on the server's machine,
`bench xnode --peer HOST` on the client's.

Each machine builds its pod the way the one-machine x-node scenario does (a node
namespace with a bridge, the pod, its HAProxy sidecar as uid 1337; the server also runs
the HTTP app and iperf3), and joins that node namespace to the machine's own namespace
with a veth and routes: its pod subnet to the lab, the other machine's pod subnet to the
other machine (forwarding is turned on for the run and restored after). Client pods are
10.91.0.0/24, server pods 10.92.0.0/24, as in the x-node scenario.

The client drives the run over one TCP connection (JSON lines): for every run it asks
the server to build a fresh pod in the mode under test (datapath loaded and pod enrolled
on the server's own node, as on a real cluster), and to meter the server's CPU during
each measurement, so the results hold both sides' costs (CPU per unit adds the two
machines'; when both roles run on one machine, as in tests/test_bench_peer.py, the
machine totals are counted twice). The server serves one client and then removes
everything it made.
"""
import json
import os
import socket
import subprocess

from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.ops import enrollment, ensure, loader
from interceptor.harness import lab as labmod
from interceptor.harness.bench import modes, tools
from interceptor.harness.bench.topology import Topology

CONTROL_PORT = 15599
CLIENT_NET, SERVER_NET = 91, 92
HOST_SIDE, NODE_SIDE = "10.98.0.1", "10.98.0.2"     # /30 between a machine and its lab


def pod_ip(net):
    return f"10.{net}.0.2"      # the first pod of a Lab


class PeerError(OSError):
    """The other machine is unreachable or refused a step (an OSError: the CLI reports it)."""


# --- plumbing ----------------------------------------------------------------------------
def _ip(*argv, netns=None):
    cmd = ["ip", "netns", "exec", netns, "ip", *argv] if netns else ["ip", *argv]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class HostLink:
    """This machine's namespace <-> the lab's node namespace, routed both ways."""

    def __init__(self, lab, local_net, remote_net, peer_ip):
        self.dev = f"{lab.prefix}h"[:15]
        self.routes = []
        self.forwarding = None
        _ip("link", "add", self.dev, "type", "veth", "peer", "name", "tohost", "netns", lab.node_ns)
        _ip("addr", "add", f"{HOST_SIDE}/30", "dev", self.dev)
        _ip("link", "set", self.dev, "up")
        _ip("addr", "add", f"{NODE_SIDE}/30", "dev", "tohost", netns=lab.node_ns)
        _ip("link", "set", "tohost", "up", netns=lab.node_ns)
        _ip("route", "add", "default", "via", HOST_SIDE, netns=lab.node_ns)
        subprocess.run(["ip", "netns", "exec", lab.node_ns, "sysctl", "-q", "-w",
                        "net.ipv4.ip_forward=1"], check=True, capture_output=True)
        for dst, via in ((f"10.{local_net}.0.0/24", NODE_SIDE), (f"10.{remote_net}.0.0/24", peer_ip)):
            _ip("route", "replace", dst, "via", via)
            self.routes.append(dst)
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            self.forwarding = f.read().strip()
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")

    def close(self):
        for dst in self.routes:
            subprocess.run(["ip", "route", "del", dst], capture_output=True)
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True)
        if self.forwarding is not None:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write(self.forwarding)


class _Half(Topology):
    """One machine's half of the cross-machine topology (a Topology without the other
    pod): builds the lab, the pod, the link and the sidecar; the server also the apps."""

    def __init__(self, role, peer_ip):
        self.cross_node = True
        self.server_node = None
        self.labs, self.pids, self.link = [], {}, None
        net, other = (CLIENT_NET, SERVER_NET) if role == "client" else (SERVER_NET, CLIENT_NET)
        try:
            self.labs = [labmod.Lab(prefix=f"icv{os.getpid() % 10000}{role[0]}", net=net)]
            pod = self.labs[0].add_pod(role)
            self.link = HostLink(self.labs[0], net, other, peer_ip)
            self._start_pod(pod, peer=pod_ip(other))
            if role == "server":
                self.server = pod
                self._start_server_apps(pod)
            else:
                self.client = pod
        except BaseException:
            self.close()
            raise

    @property
    def sidecar_pids(self):
        return [pid for name, pid in self.pids.items() if name.startswith("sidecar-")]

    def close(self):
        if self.link is not None:
            self.link.close()
        super().close()


class _Remote:
    """An address: what the client side knows of the server pod."""

    def __init__(self, ipv4):
        self.ipv4 = ipv4


# --- the control channel -----------------------------------------------------------------
class Control:
    def __init__(self, sock):
        self.sock = sock
        self.file = sock.makefile("rw", encoding="utf-8", newline="\n")

    def send(self, obj):
        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()

    def receive(self):
        line = self.file.readline()
        if not line:
            raise PeerError("the peer closed the control connection")
        return json.loads(line)

    def call(self, cmd, **args):
        self.send(dict(args, cmd=cmd))
        reply = self.receive()
        if not reply.get("ok"):
            raise PeerError(f"peer: {cmd} failed: {reply.get('error')}")
        return reply

    def close(self):
        try:
            self.file.close()
        finally:
            self.sock.close()


def parse_address(text, default_host=None):
    """HOST[:PORT] (a client's --peer) or [ADDR:]PORT (--serve, given default_host)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host and text.isdigit():
            host, port = default_host, text
        else:
            host, port = text, str(CONTROL_PORT)
    host = (host or default_host or "").strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{text!r}: expected HOST[:PORT]" if default_host is None
                         else f"{text!r}: expected [ADDR:]PORT")
    return host, int(port)


# --- client side -------------------------------------------------------------------------
class RemoteServerNode:
    """modes.apply's server_node for a server on another machine."""

    def __init__(self, control):
        self.control = control

    def apply(self, mode, want, topo):
        self.control.call("mode", mode=mode)

    def release(self, topo):
        self.control.call("release")


class PeerCpuMeter:
    """This machine's CpuMeter plus the server machine's, for the same interval."""

    def __init__(self, local, control):
        self.local, self.control = local, control

    def __enter__(self):
        self.control.call("cpu_start")
        self.local.__enter__()
        return self

    def __exit__(self, *exc):
        self.local.__exit__(*exc)
        self.remote = self.control.call("cpu_stop")["cpu"]

    def per(self, units):
        if not units:
            return self.local.per(units)
        return {key + "_ms": 1000 * (getattr(self.local, key + "_s") + self.remote[key + "_s"]) / units
                for key in ("sidecars", "kernel", "total")}


class ClientTopology(_Half):
    def __init__(self, control, peer_ip):
        super().__init__("client", peer_ip)
        self.control = control
        self.server = _Remote(pod_ip(SERVER_NET))
        self.server_node = RemoteServerNode(control)

    def cpu_meter(self):
        return PeerCpuMeter(tools.CpuMeter(self.sidecar_pids), self.control)


def connect(peer):
    """peer: (host, port) of `bench --serve`."""
    host, port = peer
    try:
        sock = socket.create_connection((host, port), timeout=600)
    except OSError as exc:
        raise PeerError(f"cannot reach `interceptor bench --serve` at {host}:{port}: {exc.strerror}") from None
    return Control(sock), socket.gethostbyname(host)


# --- server side -------------------------------------------------------------------------
def serve(listen, log=print):
    """Serve one client's run on listen (host, port), then remove everything. Returns
    when the client is done (or gone)."""
    import signal
    from interceptor.harness.bench.run import _interrupt
    signal.signal(signal.SIGTERM, _interrupt)     # cleanup runs on SIGTERM too
    host, port = listen
    listener = socket.create_server((host, port), reuse_port=False)
    log(f"bench peer: waiting for `interceptor bench xnode --peer` on {host}:{port}")
    try:
        conn, (client_ip, _) = listener.accept()
    finally:
        listener.close()
    log(f"bench peer: client {client_ip} connected")
    control = Control(conn)
    server = _Server(client_ip, log)
    try:
        while True:
            try:
                msg = control.receive()
            except PeerError:
                break
            try:
                reply = server.handle(msg)
            except Exception as exc:     # reported to the client, which stops the run
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            control.send(reply)
            if msg.get("cmd") == "bye":
                break
    finally:
        server.release()
        loader.unload()
        control.close()
        log("bench peer: done, everything removed")


class _Server:
    def __init__(self, client_ip, log):
        self.client_ip, self.log = client_ip, log
        self.topo = None
        self.meter = None

    def handle(self, msg):
        cmd = msg.get("cmd")
        if cmd == "hello":
            from interceptor.harness.bench.run import environment
            return {"ok": True, "env": environment()}
        if cmd == "mode":
            self.release()
            self.topo = _Half("server", self.client_ip)
            want = modes._LOAD[msg["mode"]]
            if want is None:
                loader.unload()
            else:
                load_mode, bypass, legs = want
                node = node_state.current() if node_state.is_loaded() else None
                if node is None or node.requested_mode != load_mode:
                    loader.unload()
                ensure.load(mode=load_mode, bypass=bypass)
                enrollment.enroll(self.topo.server.netns_path, PodSettings(bypass=legs),
                                  pod="bench/server")
            self.log(f"bench peer: {msg['mode']}")
            return {"ok": True, "server": str(self.topo.server.ipv4)}
        if cmd == "cpu_start":
            self.meter = tools.CpuMeter(self.topo.sidecar_pids).__enter__()
            return {"ok": True}
        if cmd == "cpu_stop":
            self.meter.__exit__(None, None, None)
            m = self.meter
            return {"ok": True, "cpu": {"sidecars_s": m.sidecars_s, "kernel_s": m.kernel_s,
                                        "total_s": m.total_s}}
        if cmd == "release":
            self.release()
            return {"ok": True}
        if cmd == "bye":
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def release(self):
        if self.topo is None:
            return
        try:
            if node_state.node_plan() is not None:
                enrollment.unenroll(netns_path=self.topo.server.netns_path)
        finally:
            self.topo.close()
            self.topo = None

