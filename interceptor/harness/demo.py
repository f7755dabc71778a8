"""The README's main job (`make demo`): two pods with HAProxy sidecars (`make demo
PROXY=envoy`: Envoy as Istio configures it), intercepted by the eBPF datapath, one HTTP
request from one app to the other, and what each sidecar saw (HAProxy's log, or Envoy's
own listener, route and cluster counters); a connection to the server's proxy port from
outside, dropped by its ingress filter; then `interceptor status`, and everything
removed again.
"""
import argparse
import subprocess
import sys
import time

from interceptor import abi
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.datapath.maps import Maps
from interceptor import pieces
from interceptor.ops import counters, enrollment, ensure, loader, status
from interceptor.harness import lab as labmod

SERVICE_PORT = 8080
SERVICE_VIP = "10.96.0.10"       # the server's Service address, as the client's Envoy knows it
SERVICE_NAME = "server"
# run in the client pod: one connection held open while `status` shows it
HOLD_CONNECTION = "import socket,sys,time; s=socket.create_connection((sys.argv[1],int(sys.argv[2]))); time.sleep(60)"


def envoy_counters(pod_name):
    """The Envoy counters that show each hop, as an Istio user reads them: the client's
    per-port listener (handed over by 15001), route and cluster; the server's 15006,
    port chain and inbound cluster."""
    from interceptor.harness import envoy_sidecar as e
    if pod_name == "client":
        return (f"listener.0.0.0.0_{SERVICE_PORT}.downstream_cx_total",
                e.requests_stat("outbound", SERVICE_PORT),
                e.cluster_stat(e.Service(SERVICE_NAME, SERVICE_PORT, []).cluster, "upstream_rq_200"))
    return (f"listener.0.0.0.0_{abi.INBOUND_PORT}.downstream_cx_total",
            e.requests_stat("inbound", SERVICE_PORT),
            e.cluster_stat(e.inbound_cluster(SERVICE_PORT), "upstream_rq_200"))


def say(msg=""):
    print(msg, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m interceptor.harness.demo")
    ap.add_argument("--proxy", choices=("haproxy", "envoy"), default="haproxy",
                    help="the pods' sidecar (envoy: as Istio configures it)")
    proxy = ap.parse_args(argv).proxy
    envoy = proxy == "envoy"
    if envoy:
        from interceptor.harness import envoy_sidecar
        envoy_sidecar.binary()          # EnvoyMissing says how to install it, before anything
    loaded_here = not node_state.is_loaded()
    if loaded_here:
        say("== Loading the datapath (compile once, pin, attach at the cgroup2 root)")
        ensure.load(log=say)
    lab = labmod.Lab(prefix="icdemo", net=78)
    try:
        client = lab.add_pod("client")
        server = lab.add_pod("server")
        say(f"== Pods: client {client.ipv4}, server {server.ipv4} (network namespaces on one bridge)")
        server.spawn(sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(SERVICE_PORT),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        labmod.wait_listening(server, SERVICE_PORT)
        if envoy:
            service = envoy_sidecar.Service(SERVICE_NAME, SERVICE_PORT, [server.ipv4], vips=[SERVICE_VIP])
            for pod in (client, server):
                lab.start_envoy(pod, app_ports=[SERVICE_PORT], services=[service])
            say("== Envoy sidecars as Istio configures them, as uid 1337 (virtualOutbound :15001, "
                f"virtualInbound :15006, 0.0.0.0_{SERVICE_PORT}, admin 127.0.0.1:15000)")
            before = {p.name: envoy_sidecar.stats(p.netns_path) for p in (client, server)}
        else:
            _, client_log = lab.start_haproxy(client)
            _, server_log = lab.start_haproxy(server)
            say("== HAProxy sidecars running as uid 1337 (outbound :15001, inbound :15006)")
        for pod in (client, server):
            rec = enrollment.enroll(pod.netns_path, PodSettings(), pod=f"demo/{pod.name}")
            piece, applied = pieces.filter_of(rec)
            ingress_filter = ", ".join(pieces.filter_label(piece.mechanism, a)
                                       for a in piece.describe(applied)[0]) if piece else "off"
            say(f"   enrolled demo/{pod.name} (netns cookie {rec.cookie}; ingress filter {ingress_filter})")
        server_filter = ingress_filter     # the server went last (rec is its record)

        target = SERVICE_VIP if envoy else server.ipv4
        say(f"\n== curl http://{target}:{SERVICE_PORT}/ from the client app")
        out = client.run("curl", "-sS", "-o", "/dev/null", "-m", "10", "-w",
                         "HTTP %{http_code}, app connected to %{remote_ip}:%{remote_port}",
                         f"http://{target}:{SERVICE_PORT}/", check=False)
        say("   " + (out.stdout or out.stderr).strip())
        time.sleep(0.3)
        if envoy:
            say("\n== What the sidecars counted (Envoy's own statistics, from its admin endpoint)")
            for pod in (client, server):
                moved = envoy_sidecar.diff(envoy_sidecar.stats(pod.netns_path), before[pod.name])
                for name in envoy_counters(pod.name):
                    say(f"   {pod.name:<7} {name} +{moved.get(name, 0)}")
        else:
            say("\n== What the sidecars saw (HAProxy logs: dst is the original destination)")
            for name, log in (("client", client_log), ("server", server_log)):
                for line in open(log).read().splitlines():
                    if "frontend=" in line:
                        say(f"   {name:<7} {line}")

        say(f"\n== The server's outbound capture port {abi.OUTBOUND_PORT}, from the client pod's proxy uid")
        # as the proxy uid, so the client's own capture leaves it alone: straight to the server
        probe = client.run("setpriv", f"--reuid={abi.PROXY_UID}", f"--regid={abi.PROXY_GID}", "--clear-groups",
                           "curl", "-sS", "-o", "/dev/null", "-m", "2",
                           f"http://{server.ipv4}:{abi.OUTBOUND_PORT}/", check=False)
        dropped = _pod_counters(rec).get("ingress_dropped_protected_port", {}).get("count", 0)
        blocked = probe.returncode != 0 and dropped > 0
        say(f"   {'not reachable' if probe.returncode else 'REACHABLE'}: the server's ingress filter "
            f"({server_filter}) dropped {dropped} packet(s) to it")

        holder = client.spawn(sys.executable, "-c", HOLD_CONNECTION, str(server.ipv4), str(SERVICE_PORT))
        time.sleep(0.5)
        say("\n== interceptor status (one connection held open)")
        report = status.collect()
        say(status.render(report))
        labmod.stop_process(holder)
        ok = out.returncode == 0 and "HTTP 200" in out.stdout and blocked and not report["errors"]
        say("\n== " + ("Intercepted in both directions; the proxy's port is shielded." if ok
                        else "Something went wrong (see above)."))
        return 0 if ok else 1
    finally:
        for pod in lab.pods.values():
            enrollment.unenroll(netns_path=pod.netns_path)
        lab.close()
        if loaded_here:
            loader.unload()
        say("== Cleaned up: pods, sidecars" + (" and the datapath" if loaded_here else ""))


def _pod_counters(rec):
    """The pod's counters by reason, wherever its pieces keep them (the datapath's stats
    map, or the nftables filter's named counters)."""
    try:
        with Maps() as maps:
            return counters.by_pod(maps, {rec.cookie: rec}).get(rec.cookie, {})
    except OSError:     # a node without BPF: the pieces' own counters
        return counters.by_pod(None, {rec.cookie: rec}).get(rec.cookie, {})


if __name__ == "__main__":
    sys.exit(main())
