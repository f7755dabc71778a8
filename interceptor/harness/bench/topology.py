"""The benchmark's pods: a client pod (the load generator is its app) and a server pod
(a HAProxy answering HTTP and an iperf3 server are its apps), each with a sidecar as uid
1337 (HAProxy, single-threaded, or Envoy as Istio configures it, with Istio's 2 worker
threads: `bench --proxy envoy`), on one bridge in a node namespace (same node). Nothing
touches the host's network; everything goes with close()."""
import os
import subprocess

from interceptor import abi
from interceptor.harness import lab as labmod
from interceptor.harness.bench import tools

APP_PORT = 8080
# The app answers on APP_PORT .. APP_PORT + APP_PORTS - 1. Connection-per-request runs use
# a port of their own per mode (and exclusion-list size), so no run's new SYNs land on the
# TIME_WAIT 4-tuples an earlier run left behind (60 s): without it, whichever mode runs
# after the others loses a third of its rate to collisions, not to interception.
APP_PORTS = 40
EXPLICIT_APP_PORT = APP_PORT + 1     # = modes.app_port("explicit")
IPERF_PORT = 5201
EXPLICIT_OUT = 16001     # explicit mode: the app talks to its sidecar on this port...
EXPLICIT_IN = 16006      # ...which talks to the server's sidecar on this one
EXPLICIT_OUT_IPERF = 16002
EXPLICIT_IN_IPERF = 16007

# maxconn and the idle timeouts: small for the benches that open a few connections at a
# time; the concurrent-connections bench (bench/conns.py) holds many idle ones
SIDECAR = """\
global
    uid {uid}
    gid {gid}
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client {idle}
    timeout server {idle}
frontend outbound
    bind 0.0.0.0:{outbound}
    default_backend original_dst
frontend inbound
    bind 0.0.0.0:{inbound}
    default_backend inbound_original_dst
backend original_dst
    server s 0.0.0.0:0
backend inbound_original_dst
    # from Istio's inbound source, which capture leaves alone (else a self-call)
    server s 0.0.0.0:0 source 127.0.0.6
# explicit mode (no interception): app -> 127.0.0.1:{explicit_out} -> peer sidecar :{explicit_in} -> app
frontend explicit_out
    bind 127.0.0.1:{explicit_out}
    default_backend peer_sidecar
backend peer_sidecar
    server s {peer}:{explicit_in}
frontend explicit_in
    bind 0.0.0.0:{explicit_in}
    default_backend local_app
backend local_app
    server s 127.0.0.1:{app_port}
frontend explicit_out_iperf
    bind 127.0.0.1:{explicit_out_iperf}
    default_backend peer_sidecar_iperf
backend peer_sidecar_iperf
    server s {peer}:{explicit_in_iperf}
frontend explicit_in_iperf
    bind 0.0.0.0:{explicit_in_iperf}
    default_backend local_iperf
backend local_iperf
    server s 127.0.0.1:{iperf_port}
"""

APP = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    timeout connect 5s
    timeout client {idle}
    timeout server {idle}
frontend app
    bind 0.0.0.0:{app_port}-{app_port_last}
    http-request return status 200 content-type text/plain string ok
"""

MAXCONN = 4096
IDLE = "60s"

# Namespaced sysctls applied in both pods, reported with the results: connection-per-
# request runs otherwise hit TIME_WAIT 4-tuple collisions that look like latency spikes.
POD_SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "10000 60999",
}


# The second "node" of the cross-node variant gets a datapath instance of its own (its
# own pins and state), so that, as between real machines, neither node's bypass knows the
# other's pods.
NODE2_ENV = {"INTERCEPTOR_PIN_ROOT": "/sys/fs/bpf/interceptor-bench-node2",
             "INTERCEPTOR_RUN_DIR": "/run/interceptor-bench-node2"}


def pod_lab(topo, pod):
    return next(lab for lab in topo.labs if pod.name in lab.pods and lab.pods[pod.name] is pod)


class Topology:
    """same node: both pods on one bridge. cross_node: the client pod on node1's bridge
    (10.91.0.0/24), the server pod on node2's (10.92.0.0/24), the two node namespaces
    joined by a routed veth link."""
    proxy = "haproxy"       # the two-machine halves (peer.py) run HAProxy

    def __init__(self, cross_node=False, proxy="haproxy"):
        from interceptor.harness.bench.modes import LocalNode2
        tag = f"icb{os.getpid() % 10000}"
        self.cross_node = cross_node
        self.proxy = proxy
        self.server_node = LocalNode2() if cross_node else None
        self.labs = []
        self.pids = {}
        try:
            if cross_node:
                self.labs = [labmod.Lab(prefix=f"{tag}a", net=91), labmod.Lab(prefix=f"{tag}b", net=92)]
                self.client = self.labs[0].add_pod("client")
                self.server = self.labs[1].add_pod("server")
                self._join_nodes(*self.labs)
            else:
                self.labs = [labmod.Lab(prefix=tag, net=90)]
                self.client = self.labs[0].add_pod("client")
                self.server = self.labs[0].add_pod("server")
            self._start_pod(self.client, peer=self.server)
            self._start_pod(self.server, peer=self.client)
            self._start_server_apps(self.server)
        except BaseException:
            self.close()
            raise

    @property
    def lab(self):
        return self.labs[0]

    def _join_nodes(self, lab1, lab2):
        """A veth between the two node namespaces, 10.99.0.1/30 - 10.99.0.2/30, with a
        route to the other node's pod subnet and forwarding on (namespaced sysctls)."""
        def node(lab, *argv):
            subprocess.run(["ip", "netns", "exec", lab.node_ns, *argv], check=True,
                           capture_output=True)
        node(lab1, "ip", "link", "add", "tonode2", "type", "veth", "peer", "name", "tonode1",
             "netns", lab2.node_ns)
        for lab, dev, mine, other_net in ((lab1, "tonode2", "10.99.0.1", "10.92.0.0/24"),
                                          (lab2, "tonode1", "10.99.0.2", "10.91.0.0/24")):
            peer = "10.99.0.2" if mine.endswith(".1") else "10.99.0.1"
            node(lab, "ip", "addr", "add", f"{mine}/30", "dev", dev)
            node(lab, "ip", "link", "set", dev, "up")
            node(lab, "ip", "route", "add", other_net, "via", peer)
            node(lab, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def _write_and_spawn(self, pod, name, config):
        path = os.path.join(self.lab.workdir, f"{name}-{pod.name}.cfg")
        with open(path, "w") as f:
            f.write(config)
        proc = pod.spawn("haproxy", "-db", "-f", path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        self.pids[f"{name}-{pod.name}"] = proc.pid
        return proc

    def _start_pod(self, pod, peer):
        """The pod's sysctls and its sidecar (whose explicit path leads to peer)."""
        for key, value in POD_SYSCTLS.items():
            pod.run("sysctl", "-q", "-w", f"{key}={value}")
        if self.proxy == "envoy":
            self._start_envoy(pod, peer)
        else:
            self._start_sidecar(pod, getattr(peer, "ipv4", peer))     # a pod, or its address

    def _start_envoy(self, pod, peer):
        """Envoy as Istio configures the sidecar: the server's app ports as its inbound
        ports and as the client's Service (per-port listeners and routes), iperf3 by
        passthrough; the explicit paths through the HTTP connection manager as well (so
        `explicit` differs from the captured modes by interception alone)."""
        from interceptor.harness import envoy_sidecar
        ports = range(APP_PORT, APP_PORT + APP_PORTS)
        server = peer if pod is self.client else pod
        services = [envoy_sidecar.Service(f"app-{p}", p, [server.ipv4]) for p in ports]
        explicit = [envoy_sidecar.Explicit("out", "127.0.0.1", EXPLICIT_OUT, peer.ipv4, EXPLICIT_IN),
                    envoy_sidecar.Explicit("in", "0.0.0.0", EXPLICIT_IN, "127.0.0.1", EXPLICIT_APP_PORT),
                    envoy_sidecar.Explicit("out_iperf", "127.0.0.1", EXPLICIT_OUT_IPERF, peer.ipv4,
                                           EXPLICIT_IN_IPERF, http=False),
                    envoy_sidecar.Explicit("in_iperf", "0.0.0.0", EXPLICIT_IN_IPERF, "127.0.0.1",
                                           IPERF_PORT, http=False)]
        proc, _ = pod_lab(self, pod).start_envoy(pod, app_ports=ports, services=services,
                                                 explicit=explicit, families=(4,))
        self.pids[f"sidecar-{pod.name}"] = proc.pid

    def _start_server_apps(self, pod):
        self._write_and_spawn(pod, "app", APP.format(
            app_port=APP_PORT, app_port_last=APP_PORT + APP_PORTS - 1, maxconn=MAXCONN, idle=IDLE))
        self.pids["iperf3"] = pod.spawn("iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL).pid
        labmod.wait_listening(pod, APP_PORT)
        labmod.wait_listening(pod, IPERF_PORT)

    def _start_sidecar(self, pod, peer, maxconn=MAXCONN, idle=IDLE):
        self._write_and_spawn(pod, "sidecar", SIDECAR.format(
            maxconn=maxconn, idle=idle, uid=abi.PROXY_UID, gid=abi.PROXY_GID, outbound=abi.OUTBOUND_PORT,
            inbound=abi.INBOUND_PORT, explicit_out=EXPLICIT_OUT, explicit_in=EXPLICIT_IN,
            peer=peer, app_port=EXPLICIT_APP_PORT, explicit_out_iperf=EXPLICIT_OUT_IPERF,
            explicit_in_iperf=EXPLICIT_IN_IPERF, iperf_port=IPERF_PORT))
        for port in (abi.OUTBOUND_PORT, abi.INBOUND_PORT, EXPLICIT_OUT, EXPLICIT_IN):
            labmod.wait_listening(pod, port)

    @property
    def sidecar_pids(self):
        # (Envoy runs under setpriv, which execs it: the PID is Envoy's)
        return [self.pids["sidecar-client"], self.pids["sidecar-server"]]

    def cpu_meter(self):
        return tools.CpuMeter(self.sidecar_pids)

    def close(self):
        for lab in self.labs:
            lab.close()
