"""`interceptor selfcheck`: the behavioural core on this node, end to end, with real parts.

Loads the datapath (in the mode asked for; `auto` takes what doctor finds), makes two pods
in network namespaces with sidecars (uid 1337): HAProxy, or with `--proxy envoy` Envoy as
Istio configures it (envoy_sidecar). Enrolls them, and checks what an operator relies on:
the client's request reaches the server through both sidecars, each sidecar learns the
original destination (HAProxy's log; Envoy's own listener, route and cluster counters),
with Envoy a pod calling its own Service passes its inbound sidecar as under Istio, the
server's ingress filter drops a connection to its proxy's capture port, `status` calls
the node healthy, and unload leaves nothing.
The kernel matrix (vm/matrix.py) runs it on each kernel; on a node it is a smoke test
before enrolling real pods. It refuses to run on a node where the datapath is loaded:
it would unload it.
"""
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from interceptor import abi
from interceptor.pod import podrecord
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.ops import enrollment, ensure, loader, residue, status
from interceptor.harness import lab as labmod

SERVICE_PORT = 8080
LAB_NET = 79                     # 10.79.0.0/24: the lab's own bridge, inside its own netns
LAB_PREFIX = "icself"            # its namespaces: icself-node, icself-client, icself-server
POD_NAMESPACE = "selfcheck"      # its pods' names: selfcheck/client, selfcheck/server
SIDECAR_LOG_WAIT_S = 10
# the steps of a full run, in order (a run that stops early adds "unexpected" before unload)
STEPS = ("load", "enroll", "request", "outbound capture", "inbound capture", "ingress filter",
         "status", "unload")          # emulated guests (the kernel matrix) are ~8x slower
ENVOY_STEPS = STEPS[:5] + ("self-call",) + STEPS[5:]
SERVICE_NAME = "server"
SERVICE_VIP = "10.96.0.10"       # the server's ClusterIP: only the client's Envoy knows it


@dataclass
class Step:
    name: str
    ok: bool
    detail: str


@dataclass
class Result:
    requested_mode: str
    kernel: str
    proxy: str = "haproxy"
    plan: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)

    @property
    def ok(self):
        return bool(self.steps) and all(s.ok for s in self.steps)

    def to_json(self):
        return {"requested_mode": self.requested_mode, "kernel": self.kernel, "proxy": self.proxy,
                "ok": self.ok,
                "plan": self.plan, "steps": [asdict(s) for s in self.steps]}

    def render(self):
        lines = [f"selfcheck, --mode {self.requested_mode}, --proxy {self.proxy}, kernel {self.kernel}"]
        if self.plan:
            lines.append(f"  plan: {describe_plan(self.plan)}")
        lines += [f"  {'ok  ' if s.ok else 'FAIL'}  {s.name:<18}{s.detail}" for s in self.steps]
        lines.append("  => " + ("all checks passed" if self.ok else "FAILED"))
        return "\n".join(lines)


def describe_plan(plan):
    """The plan's one line and its fallbacks (plan: a Plan or its recorded form)."""
    from interceptor.datapath.plan import Plan
    plan = plan if isinstance(plan, Plan) else Plan.from_json(plan)
    return "; ".join([plan.describe()] + plan.fallbacks())


@dataclass
class _Pod:
    """A lab pod with its sidecar (HAProxy's log, or Envoy, read by its statistics) and
    its enrollment."""
    pod: labmod.Pod
    sidecar_log: str = ""
    cookie: int = 0


class _Stop(Exception):
    """A step failed that later steps depend on."""


def run(mode="auto", log=lambda msg: None, proxy="haproxy"):
    import platform
    result = Result(requested_mode=mode, kernel=platform.release(), proxy=proxy)

    def step(name, ok, detail, fatal=False):
        result.steps.append(Step(name, bool(ok), detail))
        log(f"{'ok' if ok else 'FAIL'}: {name}: {detail}")
        if fatal and not ok:
            raise _Stop(name)

    _remove_leftovers(log)
    if proxy == "envoy":
        from interceptor.harness import envoy_sidecar
        try:
            envoy_sidecar.binary()
        except envoy_sidecar.EnvoyMissing as exc:
            step("load", False, str(exc))
            return result
    if node_state.is_loaded():
        step("load", False, "the datapath is already loaded on this node: selfcheck loads and "
                            "unloads its own, run it on a node without pods", fatal=False)
        return result
    lab = None
    try:
        try:
            started = time.monotonic()
            ensure.load(mode=mode, log=log)
        except loader.LoadError as exc:
            step("load", False, str(exc), fatal=True)
        result.plan = node_state.node_plan().to_json(pieces=False)
        step("load", True, f"{describe_plan(result.plan)} ({time.monotonic() - started:.1f} s)")
        lab = labmod.Lab(prefix=LAB_PREFIX, net=LAB_NET)
        if proxy == "envoy":
            client, server = _envoy_pods(lab, step)
            _envoy_capture(client, server, step)
        else:
            client, server = _pods(lab, step)
            _capture(client, server, step)
        _ingress_drop(client, server, step)
        _status(step)
    except _Stop:
        pass
    except Exception as exc:        # report it as the failing step, then clean up
        step("unexpected", False, f"{type(exc).__name__}: {exc}")
    finally:
        _unload(lab, step)
    return result


def _remove_leftovers(log):
    """What a selfcheck killed half-way left: its lab's namespaces (and the processes
    still in them, found by namespace and ended by PID), and a datapath serving nothing
    but its pods. A datapath with any other pod, or none, is the operator's: left alone."""
    for name in sorted(os.listdir("/run/netns") if os.path.isdir("/run/netns") else []):
        if not name.startswith(f"{LAB_PREFIX}-"):
            continue
        ino = os.stat(f"/run/netns/{name}").st_ino
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == ino:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue          # gone meanwhile, or a kernel thread
        labmod.delete_netns(name)
        log(f"removed {name}, left by an interrupted selfcheck")
    pods = [rec.name for rec in podrecord.all_records().values()]
    if node_state.is_loaded() and pods and all(p.startswith(f"{POD_NAMESPACE}/") for p in pods):
        log("unloading the datapath an interrupted selfcheck left")
        loader.unload()


def _pods(lab, step):
    client, server = lab.add_pod("client"), lab.add_pod("server")
    server.spawn(sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(SERVICE_PORT),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labmod.wait_listening(server, SERVICE_PORT, timeout=30)
    pods = [_Pod(p, lab.start_haproxy(p)[1]) for p in (client, server)]
    for p in pods:
        rec = enrollment.enroll(p.pod.netns_path, PodSettings(), pod=f"{POD_NAMESPACE}/{p.pod.name}")
        p.cookie = rec.cookie
    step("enroll", True, f"two pods with HAProxy sidecars, pieces {[e.piece for e in rec.journal]}")
    return pods


def _envoy_pods(lab, step):
    from interceptor.harness import envoy_sidecar
    client, server = lab.add_pod("client"), lab.add_pod("server")
    server.spawn(sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(SERVICE_PORT),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labmod.wait_listening(server, SERVICE_PORT, timeout=30)
    service = envoy_sidecar.Service(SERVICE_NAME, SERVICE_PORT, [server.ipv4], vips=[SERVICE_VIP])
    pods = []
    for pod in (client, server):
        lab.start_envoy(pod, app_ports=[SERVICE_PORT], services=[service])
        pods.append(_Pod(pod))
    for p in pods:
        rec = enrollment.enroll(p.pod.netns_path, PodSettings(), pod=f"{POD_NAMESPACE}/{p.pod.name}")
        p.cookie = rec.cookie
    step("enroll", True, f"two pods with Envoy sidecars as Istio configures them, pieces "
                         f"{[e.piece for e in rec.journal]}")
    return pods


def _http(pod, url):
    out = pod.run("curl", "-sS", "-o", "/dev/null", "-m", "20", "-w", "%{http_code}", url,
                  check=False, timeout=40)
    return out.stdout.strip() if out.returncode == 0 else out.stderr.strip() or f"curl exit {out.returncode}"


def _envoy_capture(client, server, step):
    """The same steps, judged by what each Envoy counted: the client's request through
    its per-port outbound listener and route, the server's through virtualInbound's
    chain for the port and inbound|PORT|| (which routes only to a restored original
    destination); then the server calling its own Service, back through its 15006."""
    from interceptor.harness import envoy_sidecar
    before = {p.pod.name: envoy_sidecar.stats(p.pod.netns_path) for p in (client, server)}
    target = f"{SERVICE_VIP}:{SERVICE_PORT}"
    code = _http(client.pod, f"http://{target}/")
    step("request", code == "200", f"client app -> {target} (the server's Service): HTTP {code}")

    def moved(pod):
        return envoy_sidecar.diff(envoy_sidecar.stats(pod.pod.netns_path), before[pod.pod.name])
    outbound_rq = envoy_sidecar.requests_stat("outbound", SERVICE_PORT)
    inbound_rq = envoy_sidecar.requests_stat("inbound", SERVICE_PORT)
    routed = envoy_sidecar.cluster_stat(envoy_sidecar.Service(SERVICE_NAME, SERVICE_PORT, []).cluster,
                                        "upstream_rq_200")
    delivered = envoy_sidecar.cluster_stat(envoy_sidecar.inbound_cluster(SERVICE_PORT), "upstream_rq_200")
    c, s = moved(client), moved(server)
    step("outbound capture", c.get(outbound_rq, 0) >= 1 and c.get(routed, 0) >= 1,
         f"client's Envoy: {outbound_rq}={c.get(outbound_rq, 0)}, {routed}={c.get(routed, 0)}")
    step("inbound capture", s.get(inbound_rq, 0) >= 1 and s.get(delivered, 0) >= 1,
         f"server's Envoy: {inbound_rq}={s.get(inbound_rq, 0)}, {delivered}={s.get(delivered, 0)}")
    before[server.pod.name] = envoy_sidecar.stats(server.pod.netns_path)
    # the server's app calls its own Service: its Envoy routes it to its own pod, which
    # under Istio passes its inbound sidecar too
    code = _http(server.pod, f"http://{target}/")
    s = moved(server)
    ok = code == "200" and s.get(outbound_rq, 0) >= 1 and s.get(inbound_rq, 0) >= 1
    step("self-call", ok, f"server app -> its own Service: HTTP {code}; "
                          f"its Envoy: {outbound_rq}={s.get(outbound_rq, 0)}, {inbound_rq}={s.get(inbound_rq, 0)}")


def _sidecar_entry(pod, frontend):
    """The sidecar's first log line for that frontend: {client, dst, server} or None."""
    deadline = time.monotonic() + SIDECAR_LOG_WAIT_S
    pattern = re.compile(rf"frontend={frontend} client=(\S+) dst=(\S+) server=(\S+)")
    while True:
        with open(pod.sidecar_log) as f:
            for line in f:
                m = pattern.search(line)
                if m:
                    return dict(zip(("client", "dst", "server"), m.groups()))
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _capture(client, server, step):
    target = f"{server.pod.ipv4}:{SERVICE_PORT}"
    out = client.pod.run("curl", "-sS", "-o", "/dev/null", "-m", "20", "-w", "%{http_code}",
                     f"http://{target}/", check=False, timeout=40)
    step("request", out.returncode == 0 and out.stdout.strip() == "200",
         f"client app -> {target}: " + (f"HTTP {out.stdout.strip()}" if out.returncode == 0
                                        else out.stderr.strip()))
    for name, pod, frontend in (("outbound capture", client, "outbound"),
                                ("inbound capture", server, "inbound")):
        entry = _sidecar_entry(pod, frontend)
        if entry is None:
            step(name, False, f"{pod.pod.name}'s sidecar saw no {frontend} connection")
            continue
        # the outbound sidecar saw the app's original destination; the inbound one
        # accepted on the pod's address and port, which it forwards to
        port = abi.OUTBOUND_PORT if frontend == "outbound" else abi.INBOUND_PORT
        step(name, entry["dst"] == target,
             f"{pod.pod.name}'s sidecar (:{port}) got original destination {entry['dst']}, "
             f"forwarded to {entry['server']}")


def _ingress_drop(client, server, step):
    # as the proxy uid, so the client's own capture leaves it alone: straight to the server
    probe = client.pod.run("setpriv", f"--reuid={abi.PROXY_UID}", f"--regid={abi.PROXY_GID}",
                       "--clear-groups", "curl", "-sS", "-o", "/dev/null", "-m", "3",
                       f"http://{server.pod.ipv4}:{abi.OUTBOUND_PORT}/", check=False)
    pod = next((p for p in status.collect()["pods"] if p["cookie"] == server.cookie), {})
    dropped = pod.get("counters", {}).get("ingress_dropped_protected_port", 0)
    filt = (pod.get("ingress") or {}).get("mechanism")
    step("ingress filter", probe.returncode != 0 and dropped > 0,
         f"{server.pod.ipv4}:{abi.OUTBOUND_PORT} from the client: "
         f"{'not reachable' if probe.returncode else 'REACHABLE'}, {dropped} packet(s) dropped"
         + (f" ({filt})" if filt else ""))


def _status(step):
    report = status.collect()
    names = sorted(p["pod"] for p in report["pods"])
    healthy = report["node"]["loaded"] and not report["errors"] and \
        names == [f"{POD_NAMESPACE}/client", f"{POD_NAMESPACE}/server"]
    step("status", healthy, "healthy, pods " + ", ".join(names) if healthy else
         "; ".join(report["errors"]) or f"pods {names}")


def _unload(lab, step):
    try:
        if lab is not None:
            for pod in lab.pods.values():
                enrollment.unenroll(netns_path=pod.netns_path)
            lab.close()
        loader.unload()
        left = residue.after_unload()
        step("unload", left.empty, left.describe())
    except Exception as exc:
        step("unload", False, f"{type(exc).__name__}: {exc}")
