"""Envoy as Istio configures a sidecar (interceptor/harness/envoy_sidecar.py), in two pods, in
every mode: each test asserts on Envoy's own statistics (listener, filter-chain, route
and cluster counters from its admin endpoint), so a connection that took the wrong path
fails even when the app got an answer.

Pod a calls; pod b serves HTTP on 8080 (its Service "web") and raw TCP on 9000 (no
Service: outbound and inbound passthrough). Both run Envoy with the listeners and
clusters istiod would send them; the inbound hop to the app comes from 127.0.0.6 / ::6.
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import APPS, client, loaded, pod_counters, pods_lab, start_server
from interceptor import abi
from interceptor.pod.podspec import PodSettings
from interceptor.ops import enrollment
from interceptor.harness import envoy_sidecar

pytestmark = [pytest.mark.kernel, pytest.mark.outbound, pytest.mark.inbound]

NET = 84
HTTP_PORT = 8080
TCP_PORT = 9000
TCP_BYTES = 64 << 10
# web's ClusterIPs: the IPv4 one routed by the pod's default route, the IPv6 one on-link;
# nothing answers there, only the sidecar knows them (as without kube-proxy)
SERVICE_VIP4 = "10.96.0.10"
SERVICE_VIP6 = f"fd{NET}::fa"
AGENT_PORT = 15020             # pilot-agent's port: always excluded from inbound capture
MODES = {"ebpf": dict(mode="auto"), "nftables": dict(mode="nftables"),
         "iptables": dict(mode="iptables")}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request):
    with loaded(bypass=True, **MODES[request.param]) as plan:
        yield request.param, plan


class Mesh:
    """Pods a and b, enrolled, each with its app and Envoy; c, not enrolled, is a client
    from outside the mesh (as the kubelet probing a pod)."""

    def __init__(self, lab):
        self.lab = lab
        self.a, self.b, self.c = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("c")
        # one Service per family (a dual-stack one would balance over both addresses)
        web = [envoy_sidecar.Service("web", HTTP_PORT, [self.b.ipv4], vips=[SERVICE_VIP4]),
               envoy_sidecar.Service("web-v6", HTTP_PORT, [self.b.ipv6], vips=[SERVICE_VIP6])]
        for pod in (self.a, self.b):
            http_app(pod)
            start_server(pod, TCP_PORT)
            start_server(pod, AGENT_PORT)
            lab.start_envoy(pod, app_ports=[HTTP_PORT], services=web)
            enrollment.enroll(pod.netns_path, PodSettings(), pod=f"test/{pod.name}")

    def stats(self, pod):
        return envoy_sidecar.stats(pod.netns_path)


def http_app(pod):
    proc = pod.spawn(sys.executable, APPS, "http", str(HTTP_PORT),
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "listening"


def http_get(pod, url, count=1, concurrency=1, timeout=60):
    out = pod.run(sys.executable, APPS, "http-get", url, "--count", str(count),
                  "--concurrency", str(concurrency), timeout=timeout)
    return json.loads(out.stdout)


def url(host, port=HTTP_PORT):
    host = str(host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def service_cluster(family):
    return f"outbound|{HTTP_PORT}||" + ("web" if family == 4 else "web-v6")


@pytest.fixture
def mesh(mode):
    with pods_lab("ice", NET) as lab:
        yield Mesh(lab)


def moved(mesh, pod, before):
    """The counters that moved since before, once they have settled (Envoy counts a
    connection's end after the app may have seen it)."""
    def traffic(stats):
        return {k: v for k, v in stats.items() if ".admin." not in k and not k.startswith("http.admin")}
    last = traffic(mesh.stats(pod))
    for _ in range(25):
        time.sleep(0.2)
        now = traffic(mesh.stats(pod))
        if now == last:
            break
        last = now
    return envoy_sidecar.diff(last, before)


@pytest.mark.parametrize("family", [4, 6])
def test_http_through_both_sidecars_by_route_and_port_chain(mesh, mode, family):
    """Outbound: virtualOutbound hands the connection to the per-port listener, whose
    route sends it to outbound|8080||web; inbound: the 8080 chain of virtualInbound and
    inbound|8080|| (ORIGINAL_DST: it needs the original destination restored)."""
    a, b = mesh.a, mesh.b
    dst = b.ipv4 if family == 4 else b.ipv6
    before_a, before_b = mesh.stats(a), mesh.stats(b)
    out = http_get(a, url(dst), count=20)
    assert out["codes"] == {"200": 20}, out
    source = abi.INBOUND_SOURCE_V4 if family == 4 else abi.INBOUND_SOURCE_V6
    assert {r["peername"].rsplit(":", 1)[0] for r in out["reports"]} == {source}
    sa, sb = moved(mesh, a, before_a), moved(mesh, b, before_b)
    assert sa.get("http.outbound_0.0.0.0_8080.downstream_rq_total") == 20, sa
    assert sa.get(f"cluster.{service_cluster(family)}.upstream_rq_200") == 20, sa
    assert sa.get("cluster.PassthroughCluster.upstream_cx_total", 0) == 0, sa
    assert sb.get("http.inbound_0.0.0.0_8080.downstream_rq_total") == 20, sb
    assert sb.get("cluster.inbound|8080||.upstream_rq_200") == 20, sb
    assert sb.get("cluster.inbound|8080||.upstream_cx_none_healthy", 0) == 0, sb
    assert sb.get("cluster.InboundPassthroughCluster.upstream_cx_total", 0) == 0, sb
    if mode[0] == "ebpf":
        cb = pod_counters(b)
        assert cb["in_steered"] >= 1 and cb["orig_dst_own_address"] >= 1, cb


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_through_both_passthrough_clusters(mesh, family):
    """Raw TCP to a port no Service names. (Framed: Envoy's listener filters close a
    connection whose FIN arrives before they are done, under istio-iptables as here, so
    the client announces its length instead of half-closing.)"""
    a, b = mesh.a, mesh.b
    dst = b.ipv4 if family == 4 else b.ipv6
    before_a, before_b = mesh.stats(a), mesh.stats(b)
    out = client(a, dst, TCP_PORT, nbytes=TCP_BYTES, framed=True)
    assert out["reply"]["sha256"] == out["sent_sha256"], out
    sa, sb = moved(mesh, a, before_a), moved(mesh, b, before_b)
    assert sa.get("tcp.PassthroughCluster.downstream_cx_total") == 1, sa
    assert sa.get("cluster.PassthroughCluster.upstream_cx_total") == 1, sa
    assert sb.get("tcp.InboundPassthroughCluster.downstream_cx_total") == 1, sb
    assert sb.get("cluster.InboundPassthroughCluster.upstream_cx_total") == 1, sb


def test_a_refused_port_fails_fast_for_the_app(mesh):
    """Nothing listens on b:9999: b's Envoy cannot connect and resets; the app sees the
    connection end without an answer (it does not hang)."""
    a, b = mesh.a, mesh.b
    before_b = mesh.stats(b)
    out = client(a, b.ipv4, 9999, nbytes=TCP_BYTES, framed=True, timeout=30)
    assert out.get("error") or not out.get("reply"), out
    sb = moved(mesh, b, before_b)
    assert sb.get("cluster.InboundPassthroughCluster.upstream_cx_connect_fail") == 1, sb


@pytest.mark.parametrize("family", [4, 6])
def test_a_pod_calling_its_own_service_goes_through_its_inbound_sidecar(mesh, mode, family):
    """Istio's self-call: the app calls its own Service; its request leaves by the
    outbound sidecar, whose connection to the endpoint (its own pod) goes back through
    15006 (so inbound policy and telemetry apply), and reaches the app from 127.0.0.6 /
    ::6. (The app calling its own pod address directly is not captured, as under Istio.)"""
    b = mesh.b
    dst = SERVICE_VIP4 if family == 4 else SERVICE_VIP6
    before = mesh.stats(b)
    out = http_get(b, url(dst), count=5)
    assert out["codes"] == {"200": 5}, out
    source = abi.INBOUND_SOURCE_V4 if family == 4 else abi.INBOUND_SOURCE_V6
    assert {r["peername"].rsplit(":", 1)[0] for r in out["reports"]} == {source}
    s = moved(mesh, b, before)
    assert s.get("http.outbound_0.0.0.0_8080.downstream_rq_total") == 5, s
    assert s.get("http.inbound_0.0.0.0_8080.downstream_rq_total") == 5, s
    assert s.get("cluster.inbound|8080||.upstream_rq_200") == 5, s
    if mode[0] == "ebpf":
        c = pod_counters(b)
        # (Envoy pools its upstream connections: fewer connections than requests)
        assert 1 <= c["out_self_to_inbound"] <= 5 and c["orig_dst_answered"] >= 2, c


def test_excluded_ports_reach_their_listeners_directly(mesh):
    """15021 (readiness) and 15090 (Prometheus) are Envoy's own bound listeners, 15020 the
    agent's: none of them passes through virtualInbound. Asked from outside the mesh, as
    the kubelet and Prometheus do (from a pod with a sidecar, virtualOutbound would hand
    the connection to that sidecar's own 15021 listener, under Istio as here)."""
    b, c = mesh.b, mesh.c
    before = mesh.stats(b)
    assert http_get(c, url(b.ipv4, envoy_sidecar.READINESS_PORT) + "healthz/ready")["codes"] == {"200": 1}
    stats = http_get(c, url(b.ipv4, envoy_sidecar.PROMETHEUS_PORT) + "stats/prometheus")
    assert stats["codes"] == {"200": 1}
    out = client(c, b.ipv4, AGENT_PORT, nbytes=TCP_BYTES, framed=True)
    assert out["reply"]["peername"].startswith(f"{c.ipv4}:"), out    # not via b's Envoy
    s = moved(mesh, b, before)
    assert s.get("http.agent.downstream_rq_total") == 1, s
    assert s.get("http.stats_prometheus.downstream_rq_total") == 1, s
    assert not [k for k in s if "InboundPassthrough" in k or "inbound|" in k or "15006" in k], s


def test_a_connection_to_15001_itself_goes_to_the_blackhole(mesh):
    """The app connecting to its sidecar's capture port directly: no original
    destination to hand it to, so virtualOutbound's own chain for 15001 takes it."""
    a = mesh.a
    before = mesh.stats(a)
    out = client(a, "127.0.0.1", abi.OUTBOUND_PORT, nbytes=TCP_BYTES, framed=True, timeout=30)
    assert not out.get("reply"), out
    s = moved(mesh, a, before)
    assert s.get("tcp.BlackHoleCluster.downstream_cx_total") == 1, s
    assert s.get("cluster.PassthroughCluster.upstream_cx_total", 0) == 0, s


def test_50_mib_each_way(mesh, tmp_path):
    a, b = mesh.a, mesh.b
    size = 50 << 20
    body = tmp_path / "body"
    with open(body, "wb") as f:
        f.write(os.urandom(size))
    digest = hashlib.sha256(body.read_bytes()).hexdigest()
    before_a, before_b = mesh.stats(a), mesh.stats(b)
    p = a.run("curl", "-s", "-D", "-", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
              "--data-binary", f"@{body}", "-H", "Content-Type: application/octet-stream",
              url(b.ipv4) + f"?bytes={size}", timeout=120)
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in p.stdout.splitlines() if ":" in line)}
    assert p.stdout.rstrip().endswith(f"200 {size}"), p.stdout[-200:]
    assert headers["x-received"] == str(size) and headers["x-sha256"] == digest
    sa, sb = moved(mesh, a, before_a), moved(mesh, b, before_b)
    assert sa.get("cluster.outbound|8080||web.upstream_rq_200") == 1, sa
    assert sb.get("cluster.inbound|8080||.upstream_rq_200") == 1, sb
    assert sb.get("cluster.inbound|8080||.upstream_cx_rx_bytes_total", 0) >= size, sb
    assert sb.get("cluster.inbound|8080||.upstream_cx_tx_bytes_total", 0) >= size, sb


def test_200_connections_at_once(mesh):
    a, b = mesh.a, mesh.b
    before_a, before_b = mesh.stats(a), mesh.stats(b)
    out = http_get(a, url(b.ipv4), count=200, concurrency=200, timeout=120)
    assert out["codes"] == {"200": 200}, {k: v for k, v in out.items() if k != "reports"}
    sa, sb = moved(mesh, a, before_a), moved(mesh, b, before_b)
    assert sa.get("http.outbound_0.0.0.0_8080.downstream_cx_total") == 200, sa
    assert sa.get("cluster.outbound|8080||web.upstream_rq_200") == 200, sa
    assert sb.get("http.inbound_0.0.0.0_8080.downstream_rq_total") == 200, sb
    assert sb.get("cluster.inbound|8080||.upstream_rq_200") == 200, sb
