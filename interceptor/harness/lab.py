"""A node in a box: pods as network namespaces on one bridge, with a HAProxy sidecar.

Used by the demo, the tests and the benchmarks, so all three exercise the same
topology. The bridge lives in its own "node" namespace, so nothing here touches the
host's interfaces, routes or sysctls; everything made is removed by Lab.close(), which
also ends the processes it started (by their own PID).
"""
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from pyroute2 import NetNS, netns as pyr_netns

from interceptor import abi
from interceptor.kernel import listeners

IFA_F_NODAD = 0x02

HAPROXY_CONFIG = """\
global
    uid {uid}
    gid {gid}
    nbthread 1
    log stdout format raw local0
defaults
    mode tcp
    log global
    option logasap
    log-format "frontend=%ft client=%ci:%cp dst=%fi:%fp server=%si:%sp"
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend outbound
    bind 0.0.0.0:{outbound_port}
    default_backend original_dst
frontend inbound
    bind 0.0.0.0:{inbound_port}
    default_backend inbound_original_dst
backend original_dst
    # 0.0.0.0:0 = forward to the connection's original destination (SO_ORIGINAL_DST,
    # else getsockname), the way a transparent sidecar does.
    server s 0.0.0.0:0
backend inbound_original_dst
    # the inbound hop to the app from 127.0.0.6, as Istio's Envoy makes it: interception
    # leaves that source alone (from any other, the proxy's connection to its own pod is
    # a self-call, sent back to its inbound port, as under istio-iptables)
    server s 0.0.0.0:0 source 127.0.0.6
"""


@dataclass
class Pod:
    name: str
    netns: str                   # name under /run/netns
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    procs: list = field(default_factory=list)

    @property
    def netns_path(self):
        return f"/run/netns/{self.netns}"

    def cmd(self, *argv):
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv, check=True, timeout=30, **kw):
        return subprocess.run(self.cmd(*argv), check=check, timeout=timeout,
                              capture_output=True, text=True, **kw)

    def spawn(self, *argv, **kw):
        """Start a process in the pod; Lab.close() ends it by PID."""
        proc = subprocess.Popen(self.cmd(*argv), **kw)
        self.procs.append(proc)
        return proc


class Lab:
    """Pods 10.<net>.0.2, .3, ... on bridge 10.<net>.0.1/24 (IPv6 fd<net>::N/64)."""

    def __init__(self, prefix=None, net=77):
        self.prefix = prefix or f"ic{os.getpid() % 100000}"
        self.net = net
        self.node_ns = f"{self.prefix}-node"
        self.pods = {}
        self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        os.chmod(self.workdir, 0o755)
        self._sidecars = []
        pyr_netns.create(self.node_ns)
        with NetNS(self.node_ns) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            br = ns.link_lookup(ifname="br0")[0]
            ns.addr("add", index=br, address=str(self.gateway4), prefixlen=24)
            ns.addr("add", index=br, address=str(self.gateway6), prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=br, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    @property
    def gateway4(self):
        return ipaddress.IPv4Address(f"10.{self.net}.0.1")

    @property
    def gateway6(self):
        return ipaddress.IPv6Address(f"fd{self.net}::1")

    def add_pod(self, name, extra_ipv4=()):
        index = len(self.pods) + 2
        pod = Pod(name=name, netns=f"{self.prefix}-{name}",
                  ipv4=ipaddress.IPv4Address(f"10.{self.net}.0.{index}"),
                  ipv6=ipaddress.IPv6Address(f"fd{self.net}::{index}"))
        host_if = f"{self.prefix}{name}"[:15]
        pyr_netns.create(pod.netns)
        self.pods[name] = pod           # registered first, so close() removes a half-made pod
        with NetNS(self.node_ns) as node:
            node.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
            idx = node.link_lookup(ifname=host_if)[0]
            node.link("set", index=idx, master=node.link_lookup(ifname="br0")[0], state="up")
        with NetNS(pod.netns) as ns:
            eth = _poll(lambda: ns.link_lookup(ifname="eth0"), f"eth0 in {pod.netns}")[0]
            ns.addr("add", index=eth, address=str(pod.ipv4), prefixlen=24)
            for extra in extra_ipv4:
                ns.addr("add", index=eth, address=str(extra), prefixlen=32)
            ns.addr("add", index=eth, address=str(pod.ipv6), prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=eth, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.route("add", dst="default", gateway=str(self.gateway4))
        return pod

    # --- processes ------------------------------------------------------------------
    def start_haproxy(self, pod, outbound_port=abi.OUTBOUND_PORT, inbound_port=abi.INBOUND_PORT,
                      uid=abi.PROXY_UID, gid=abi.PROXY_GID):
        """HAProxy as the pod's transparent sidecar, run as the proxy uid; its log (one
        line per connection, with the original destination it used) goes to a file."""
        cfg = os.path.join(self.workdir, f"haproxy-{pod.name}.cfg")
        log = os.path.join(self.workdir, f"haproxy-{pod.name}.log")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CONFIG.format(uid=uid, gid=gid, outbound_port=outbound_port,
                                          inbound_port=inbound_port))
        logf = open(log, "w")
        proc = pod.spawn("haproxy", "-db", "-f", cfg, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        self._sidecars.append((pod, log))
        wait_listening(pod, inbound_port)
        wait_listening(pod, outbound_port)
        return proc, log

    def start_envoy(self, pod, **shape):
        """Envoy as Istio configures the pod's sidecar (envoy_sidecar.bootstrap(**shape)),
        run as the proxy uid; returns (process, config path). Its statistics:
        envoy_sidecar.stats()."""
        from interceptor.harness import envoy_sidecar
        return envoy_sidecar.start(pod.netns_path, self.workdir, pod.name, spawn=pod.spawn, **shape)

    def close(self):
        for pod in self.pods.values():
            for proc in pod.procs:
                stop_process(proc)
        for pod in self.pods.values():
            delete_netns(pod.netns)
        delete_netns(self.node_ns)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _poll(fetch, what, timeout=5):
    """fetch() until it returns something truthy: kernel state (a moved veth peer) can
    lag the netlink call that made it."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value or time.monotonic() > deadline:
            if not value:
                raise TimeoutError(f"{what} did not appear within {timeout}s")
            return value
        time.sleep(0.02)


def delete_netns(name):
    try:
        pyr_netns.remove(name)
    except OSError:
        pass


def stop_process(proc, timeout=5):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_listening(pod, port, timeout=10):
    """Poll (sock_diag, in-process) until something listens on port in the pod; pod may
    also be a netns path."""
    path = pod if isinstance(pod, str) else pod.netns_path
    _poll(lambda: listeners.listening(path, port), f"a listener on {path} port {port}", timeout)

