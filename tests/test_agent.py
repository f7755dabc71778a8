"""The node agent (`interceptor agent`) on a real container runtime: containerd's CRI,
driven as the kubelet drives it (tests/crihelper.py), with bridge + host-local as the
primary CNI and interceptor-cni chained by the agent. The agent runs as its own process
and is stopped by SIGTERM, as a DaemonSet's pod would be. containerd runs the plugin the
agent installed in a mount namespace where no Python exists, as on a node image without
one (crihelper.NO_PYTHON_WRAPPER); every call's evidence is checked."""
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import publish_figures, start_http_app
from crihelper import Containerd
from interceptor.agent.cri import CriError
from interceptor import abi, paths
from interceptor.kernel import libbpf
from interceptor.pod import ingress_policy, podrecord
from interceptor.datapath import node_state
from interceptor.datapath.maps import Maps
from interceptor.ops import enrollment, loader
from interceptor.cni import chain as cni_chain
from interceptor.harness import envoy_sidecar, lab as labmod

pytestmark = pytest.mark.kernel
TESTS = os.path.dirname(os.path.abspath(__file__))
GATEWAY = "10.94.0.1"          # the bridge's address: a server outside every pod
OUTSIDE_PORT = 18080
WEB_PORT = 8080                # the web pod's app and Service port


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    def __init__(self, runtime, workdir):
        self.runtime, self.workdir = runtime, workdir
        self.port = free_port()
        self.proc = None
        self.log_path = os.path.join(workdir, "agent.log")

    def start(self, env=None, args=()):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interceptor.cli", "agent", "--cni-bin-dir", self.runtime.plugin_dir,
             "--cni-conf-dir", self.runtime.cni_conf, "--listen", f"127.0.0.1:{self.port}",
             "--cri-socket", self.runtime.socket, "--reconcile-every", "1", *args],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        log.close()
        return self

    def ensure_running(self):
        """Started when an earlier test has not (a test run on its own, `-k`)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None, ""

    def wait_ready(self, ready=True, timeout=30, saying=""):
        """/readyz's body once it is 200 (ready) or 503 saying so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = self.get("/readyz")
            if (code == 200) == ready and code is not None and saying in body:
                return body
            assert self.proc.poll() is None, self.log()
            time.sleep(0.1)
        raise AssertionError(f"/readyz never {'200' if ready else '503'}: {body}\n{self.log()}")

    def metric(self, name, **labels):
        _, body = self.get("/metrics")
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in body.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return None

    def stop(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def log(self):
        with open(self.log_path) as f:
            return f.read()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """containerd with two sandboxes that started before any agent: one to enroll, one
    in kube-system (excluded by the default plugin entry)."""
    loader.unload()
    workdir = str(tmp_path_factory.mktemp("cri"))
    runtime = Containerd(os.path.join(workdir, "containerd"), plugin_dir=os.path.join(workdir, "plugin-bin")).start()
    rt = runtime.runtime()
    early = rt.run_sandbox("default", "early", "uid-early")
    skipped = rt.run_sandbox("kube-system", "dns", "uid-dns")
    agent = AgentProcess(runtime, workdir)
    try:
        yield runtime, rt, agent, {"early": early, "skipped": skipped}
    finally:
        # each step whatever the one before did: a containerd left running keeps its
        # shims, mounts, sandboxes' namespaces and the forwarding it turned on
        from interceptor.agent import agent as ag
        try:
            agent.stop()
            ag.uninstall(runtime.plugin_dir, runtime.cni_conf, log=lambda msg: None)
        finally:
            try:
                rt.close()
            finally:
                runtime.stop()
                loader.unload()


def record_of(sandbox_id):
    return next((r for r in podrecord.all_records().values() if r.container_id == sandbox_id), None)


def test_the_agent_loads_chains_and_enrolls_the_pod_that_started_before_it(node):
    runtime, rt, agent, ids = node
    assert record_of(ids["early"]) is None and not node_state.is_loaded()
    agent.start()
    agent.wait_ready()
    assert node_state.is_loaded()
    owned = json.load(open(os.path.join(runtime.cni_conf, cni_chain.OWNED_NAME)))
    assert [p["type"] for p in owned["plugins"]] == ["bridge", "interceptor-cni"]
    assert owned["name"] == "k8s-pod-network"       # the primary's network, so DEL matches
    assert os.access(os.path.join(runtime.plugin_dir, "interceptor-cni"), os.X_OK)
    assert _wait_for(lambda: record_of(ids["early"]) is not None and record_of(ids["early"]).complete, 10)
    rec = record_of(ids["early"])
    assert rec is not None and rec.pod == "default/early" and rec.complete, agent.log()
    assert rec.netns == rt.sandbox(ids["early"]).netns and not enrollment.verify(rec, rec.netns)
    assert record_of(ids["skipped"]) is None              # kube-system: left alone
    assert _wait_for(lambda: agent.metric("interceptor_agent_reconciled_pods_total", action="enrolled") == 1)
    assert agent.get("/healthz")[0] == 200


def test_annotations_reach_the_plugin_and_stop_and_remove_leave_nothing(node):
    runtime, rt, agent, _ = node
    agent.wait_ready()
    sid = rt.run_sandbox("shop", "web", "uid-web", annotations={
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
        "interceptor.io/ingress-policy": "deny udp port 53"})
    rec = record_of(sid)
    assert rec is not None and rec.complete, runtime.tail_log()
    assert rec.pod == "shop/web" and rec.settings.exclude_outbound_ports == [5432]
    assert [ingress_policy.rule_text(r) for r in rec.settings.ingress_policy] == ["deny udp port 53"]
    from interceptor.ops import status
    report = status.collect(pod_filter="shop/web")
    assert [p["pod"] for p in report["pods"]] == ["shop/web"] and not report["pods"][0]["problems"]
    cookie = rec.cookie
    rt.stop_sandbox(sid)            # DEL
    assert record_of(sid) is None
    rt.remove_sandbox(sid)          # DEL again
    assert not os.path.exists(paths.pod_pin_dir(cookie))
    with Maps() as maps:
        assert maps.pods.get(__import__("ctypes").c_uint64(cookie)) is None
        assert not maps.port_rules.pod_keys(cookie) and not maps.ingress_rules.pod_keys(cookie)


def _wait_for(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_rewritten_or_replaced_primary_config_is_rechained_once(node):
    runtime, _, agent, _ = node
    agent.wait_ready()
    owned = os.path.join(runtime.cni_conf, cni_chain.OWNED_NAME)
    repairs = agent.metric("interceptor_agent_chain_repairs_total")

    def owned_has(key):
        doc = json.load(open(owned)) if os.path.exists(owned) else {}
        return key in doc and [p["type"] for p in doc["plugins"]] == ["bridge", "interceptor-cni"]

    # in place, as a primary CNI rewriting its file
    doc = json.load(open(runtime.primary_path()))
    with open(runtime.primary_path(), "w") as f:
        json.dump(dict(doc, disableCheck=True), f)
    assert _wait_for(lambda: owned_has("disableCheck"), 2), agent.log()
    # replaced by rename (aws-vpc-cni's way)
    runtime.write_primary(extra={"disableGC": True})
    assert _wait_for(lambda: owned_has("disableGC") and not owned_has("disableCheck"), 2), agent.log()
    time.sleep(1.5)          # a periodic pass too: still exactly those two repairs
    assert agent.metric("interceptor_agent_chain_repairs_total") == repairs + 2
    # the primary gone: our copy goes too, and the agent is not ready until it is back
    primary = open(runtime.primary_path()).read()
    os.unlink(runtime.primary_path())
    agent.wait_ready(False, saying="no primary CNI configuration")
    assert not os.path.exists(owned)
    with open(runtime.primary_path(), "w") as f:
        f.write(primary)
    agent.wait_ready()
    assert owned_has("disableGC")


class MeshTraffic:
    """Two sandboxes with Envoy as Istio configures their sidecars (envoy_sidecar), as
    uid 1337: `web` serves HTTP on 8080 (its Service), and a load generator in the
    other calls it and a server outside every pod (by passthrough), a new connection
    per request, until stopped."""

    def __init__(self, rt, name):
        self.rt = rt
        self.workdir = tempfile.mkdtemp(prefix="icmesh", dir="/tmp")    # readable by uid 1337
        self.sids = [rt.run_sandbox("shop", f"{name}-web", f"uid-{name}-web"),
                     rt.run_sandbox("shop", name, f"uid-{name}")]
        self.web_ns, self.client_ns = (rt.sandbox(sid).netns for sid in self.sids)
        web_ip, self.client_ip = (record_of(sid).addresses[0] for sid in self.sids)
        self.service = envoy_sidecar.Service("web", WEB_PORT, [web_ip])
        self.urls = {"web": f"http://{web_ip}:{WEB_PORT}/", "outside": f"http://{GATEWAY}:{OUTSIDE_PORT}/"}
        self.until = os.path.join(self.workdir, "stop")
        self.procs = []
        self.load = None
        self.before = {}

    def __enter__(self):
        self.procs.append(start_http_app(WEB_PORT, self.web_ns))     # the web pod's app
        self.procs.append(start_http_app(OUTSIDE_PORT))               # outside every pod
        for netns_path, name, shape in ((self.web_ns, "web", dict(app_ports=[WEB_PORT])),
                                        (self.client_ns, "client", dict(services=[self.service]))):
            proc, _ = envoy_sidecar.start(netns_path, self.workdir, name, families=(4,), **shape)
            self.procs.append(proc)
        self.before = {ns: envoy_sidecar.stats(ns) for ns in (self.web_ns, self.client_ns)}
        self.load = subprocess.Popen(["nsenter", f"--net={self.client_ns}", sys.executable,
                                      os.path.join(TESTS, "apps.py"), "http-load", *self.urls.values(),
                                      "--until", self.until], stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        return self

    def result(self):
        """Stop the load: (its counts per url, what each sidecar's counters moved by,
        the calling pod's address)."""
        open(self.until, "w").close()
        by_url = json.loads(self.load.communicate(timeout=60)[0])
        counts = {what: by_url[u] for what, u in self.urls.items()}
        saw = {ns: envoy_sidecar.diff(envoy_sidecar.stats(ns), self.before[ns]) for ns in self.before}
        return counts, saw[self.client_ns], saw[self.web_ns], self.client_ip

    def __exit__(self, *exc):
        open(self.until, "w").close()
        if self.load and self.load.poll() is None:
            self.load.kill()
            self.load.wait()
        for p in self.procs:
            labmod.stop_process(p)
        for sid in self.sids:
            self.rt.stop_sandbox(sid)
            self.rt.remove_sandbox(sid)
        shutil.rmtree(self.workdir, ignore_errors=True)


def assert_nothing_dropped(counts, client_saw, web_saw, client_ip, what):
    web, outside = counts["web"], counts["outside"]
    print(f"requests through {what}: web {web['ok']} ok, {web['failed']} failed; "
          f"outside {outside['ok']} ok, {outside['failed']} failed")
    assert web["failed"] == 0 and outside["failed"] == 0, counts
    assert web["ok"] > 25 and outside["ok"] > 25, counts
    # each request took the path Istio's sidecars give it, as their own counters say:
    # out by the Service's listener and route, in by the web pod's inbound chain and
    # cluster (whose hop to the app comes from 127.0.0.6); outside by passthrough
    assert client_saw.get(envoy_sidecar.requests_stat("outbound", WEB_PORT)) == web["ok"], client_saw
    assert client_saw.get(envoy_sidecar.cluster_stat(envoy_sidecar.PASSTHROUGH, "upstream_cx_total")) == \
        outside["ok"], client_saw
    assert web_saw.get(envoy_sidecar.requests_stat("inbound", WEB_PORT)) == web["ok"], web_saw
    assert web["peers"] == [abi.INBOUND_SOURCE_V4] and outside["peers"] == [client_ip], counts
    publish_figures({"scenario": f"{what} while a pod calls another pod's Service and a server outside, "
                                 "through Envoy sidecars as Istio configures them (containerd CRI)",
                     "tried": {"requests (a connection each)": sum(c["ok"] + c["failed"] for c in counts.values())},
                     "failures": web["failed"] + outside["failed"], "lost": 0, "leftovers": {}})


def test_agent_restart_drops_no_request_and_a_pod_started_meanwhile_waits_for_it(node, tmp_path):
    """SIGTERM leaves everything in place: established pods keep their capture (no
    request lost). A sandbox started while the agent is away fails with the retryable
    CNI error, so it never runs uncaptured; the kubelet's retry once the agent is back
    starts it, captured."""
    runtime, rt, agent, _ = node
    agent.ensure_running().wait_ready()
    with MeshTraffic(rt, "client") as traffic:
        assert agent.stop() == 0                    # SIGTERM: everything stays
        assert node_state.is_loaded() and os.path.exists(os.path.join(runtime.cni_conf, cni_chain.OWNED_NAME))
        time.sleep(1)
        with pytest.raises(CriError, match="node agent is not ready") as refused:
            rt.run_sandbox("shop", "meanwhile", "uid-meanwhile")    # no agent running
        assert "try again later" in str(refused.value)
        assert not any(r.pod == "shop/meanwhile" for r in podrecord.all_records().values())
        agent.start()
        agent.wait_ready()
        meanwhile = rt.run_sandbox("shop", "meanwhile", "uid-meanwhile", attempt=1)   # the retry
        rec = record_of(meanwhile)
        assert rec is not None and rec.complete and not enrollment.verify(rec, rec.netns)
        time.sleep(1)
        assert_nothing_dropped(*traffic.result(), "an agent restart")
    assert agent.metric("interceptor_agent_datapath_events_total", event="adopted") == 1
    rt.stop_sandbox(meanwhile)
    rt.remove_sandbox(meanwhile)


def test_a_sandbox_removed_while_the_agent_is_away_is_gone_and_cleaned_up_once_it_returns(node):
    runtime, rt, agent, _ = node
    agent.ensure_running().wait_ready()
    sid = rt.run_sandbox("default", "leaving", "uid-leaving")
    rec = record_of(sid)
    assert rec is not None and rec.complete
    assert agent.stop() == 0
    rt.stop_sandbox(sid)                        # DEL through the plugin: succeeds without the agent
    rt.remove_sandbox(sid)
    assert sid not in rt.sandbox_ids(ready_only=False)
    assert ("DEL", "python-absent") in runtime.plugin_calls()
    agent.start()
    agent.wait_ready()
    assert _wait_for(lambda: record_of(sid) is None, 10), agent.log()
    assert not os.path.exists(paths.pod_pin_dir(rec.cookie))
    with Maps() as maps:
        assert maps.pods.get(ctypes.c_uint64(rec.cookie)) is None


def test_every_call_containerd_made_ran_the_plugin_without_python(node):
    runtime, _, _, _ = node
    calls = runtime.plugin_calls()
    assert {c for c, _ in calls} >= {"ADD", "DEL"}, calls
    assert all(seen == "python-absent" for _, seen in calls), calls


def changed_datapath(workdir, change):
    """A copy of the C sources with one change: "code" (a new build of the same
    layout) or "sockets" (the inbound listeners' sockhash one entry larger: userspace
    cannot copy sockets, so this map cannot be migrated)."""
    from interceptor.datapath.bpf_source import BPF_DIR
    copy = os.path.join(workdir, f"bpf-{change}")
    shutil.copytree(BPF_DIR, copy)
    path = os.path.join(copy, "sock_connect.c" if change == "code" else "lib/maps.h")
    with open(path) as f:
        text = f.read()
    if change == "code":
        text += "\n#define INTERCEPTOR_TEST_BUILD 2      /* a changed build */\n"
    else:
        assert "= MAX_LISTENERS }" in text
        text = text.replace("= MAX_LISTENERS }", "= MAX_LISTENERS + 1 }", 1)
    with open(path, "w") as f:
        f.write(text)
    return copy


def link_prog_ids(cookie):
    pins = [paths.link_pin("connect4"), paths.link_pin("getsockopt"), paths.pod_link_pin(cookie, "sk_lookup")]
    return [libbpf.pinned_info(p, libbpf.LinkInfo).prog_id for p in pins]


def test_an_agent_of_a_changed_datapath_upgrades_it_in_place_under_load(node, tmp_path):
    runtime, rt, agent, ids = node
    agent.ensure_running().wait_ready()
    from interceptor.ops import status
    before = status.collect()["node"]["datapath_version"]
    early = record_of(ids["early"])
    old_ids = link_prog_ids(early.cookie)
    with MeshTraffic(rt, "upgraded") as traffic:
        assert agent.stop() == 0
        agent.start(env={"INTERCEPTOR_BPF_DIR": changed_datapath(str(tmp_path), "code")})
        agent.wait_ready(timeout=60)
        time.sleep(1)
        # a pod enrolled after the upgrade gets the new datapath's XDP stub and works
        after = rt.run_sandbox("shop", "after", "uid-after")
        assert record_of(after).complete and not enrollment.verify(record_of(after), record_of(after).netns)
        assert_nothing_dropped(*traffic.result(), "an in-place upgrade")
    new_ids = link_prog_ids(early.cookie)
    assert all(a != b for a, b in zip(old_ids, new_ids)), (old_ids, new_ids)   # the same links, new programs
    assert status.collect()["node"]["datapath_version"] != before
    assert not enrollment.verify(record_of(ids["early"]), early.netns)
    assert agent.metric("interceptor_agent_datapath_events_total", event="upgraded") == 1
    # and back: the original agent upgrades to its own build again
    agent.stop()
    agent.start()
    agent.wait_ready(timeout=60)
    assert status.collect()["node"]["datapath_version"] == before
    # an agent declaring other map sizes resizes the loaded maps in place, and one
    # declaring none brings back the defaults
    redirected = paths.map_pin("redirected")
    for args, entries in ((["--map-size", "redirected=131072"], 131072), ([], 65536)):
        agent.stop()
        agent.start(args=args)
        agent.wait_ready(timeout=60)
        assert libbpf.pinned_info(redirected, libbpf.MapInfo).max_entries == entries
        assert not enrollment.verify(record_of(ids["early"]), early.netns)
    assert status.collect()["node"]["datapath_version"] == before


def test_a_datapath_whose_maps_cannot_be_migrated_is_left_in_place_and_not_ready(node, tmp_path):
    _, _, agent, ids = node
    agent.ensure_running().wait_ready()
    assert_upgrade_refused_in_place(agent, ids, {"INTERCEPTOR_BPF_DIR": changed_datapath(str(tmp_path), "sockets")},
                                    saying="map inbound_listeners holds sockets")


def assert_upgrade_refused_in_place(agent, ids, env, saying):
    """An agent started with env (a build it cannot swap in): not ready saying why, the
    loaded datapath's version unchanged, the early pod still captured, the refusal
    counted; then the module's agent is started again as the other tests know it."""
    from interceptor.ops import status
    version = status.collect()["node"]["datapath_version"]
    agent.stop()
    agent.start(env=env)
    try:
        agent.wait_ready(False, timeout=60, saying=saying)
        assert node_state.is_loaded() and status.collect()["node"]["datapath_version"] == version
        rec = record_of(ids["early"])
        assert rec is not None and not enrollment.verify(rec, rec.netns)    # still captured
        assert agent.metric("interceptor_agent_datapath_events_total", event="refused") == 1
    finally:
        agent.stop()
        agent.start()
    agent.wait_ready()


def test_an_upgrade_the_kernel_refuses_part_of_keeps_the_pods_and_says_why_it_is_not_ready(node, tmp_path):
    """A new build whose xdp_ingress this kernel refuses (the loaded plan uses it): the
    loaded datapath stays, its pods captured, and /readyz names the program and why."""
    from interceptor.datapath.build import REFUSE_ENV
    _, _, agent, ids = node
    agent.ensure_running().wait_ready()
    assert_upgrade_refused_in_place(
        agent, ids, {"INTERCEPTOR_BPF_DIR": changed_datapath(str(tmp_path), "code"), REFUSE_ENV: "xdp_ingress"},
        saying=f"refuses xdp_ingress of the new datapath (named in {REFUSE_ENV})")


def test_an_agent_on_a_kernel_that_refuses_a_program_loads_the_fallback_and_says_so(node):
    """sk_lookup's program refused at the agent's first load: inbound capture runs on
    rules, the agent is ready and says which program fell back and why (readiness body,
    metrics), and a pod started now is captured by the fallback."""
    from interceptor.datapath.build import REFUSE_ENV
    runtime, rt, agent, ids = node
    agent.ensure_running().wait_ready()
    agent.stop()
    loader.unload()
    agent.start(env={REFUSE_ENV: "steer_inbound"})
    try:
        agent.wait_ready(timeout=60, saying=f"fallback: the kernel refused steer_inbound (named in {REFUSE_ENV}): "
                                            "inbound capture on nftables rules")
        assert node_state.node_plan().inbound == "rules"
        assert agent.metric("interceptor_datapath_program_refused", capability="inbound",
                            program="steer_inbound", reason=f"named in {REFUSE_ENV}") == 1
        sid = rt.run_sandbox("shop", "fallback", "uid-fallback")
        rec = record_of(sid)
        assert rec.complete and not enrollment.verify(rec, rec.netns)
        assert "capture-rules" in [e.piece for e in rec.journal]
        rt.stop_sandbox(sid)
        rt.remove_sandbox(sid)
    finally:
        # whatever happened: the module's agent back as the other tests know it
        agent.stop()
        loader.unload()
        agent.start()
    agent.wait_ready(timeout=60)
    assert _wait_for(lambda: record_of(ids["early"]) is not None, timeout=10)     # reconcile enrolls it again


def test_a_pod_whose_namespace_vanished_without_a_del_is_removed_by_reconcile(node):
    """A runtime that lost a DEL (crashed, or a node restored from a snapshot): the
    record's namespace is gone, and reconcile takes what is left of the pod away."""
    _, _, agent, _ = node
    agent.wait_ready()
    name = f"icgone{uuid.uuid4().hex[:5]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "enroll", "--netns", f"/run/netns/{name}",
                        "--pod", "test/gone"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cookie = next(c for c, rec in podrecord.all_records().items() if rec.pod == "test/gone")
    removed = agent.metric("interceptor_agent_reconciled_pods_total", action="removed")
    subprocess.run(["ip", "netns", "del", name], check=True)
    assert _wait_for(lambda: podrecord.read(cookie) is None, 10), agent.log()
    assert not os.path.exists(paths.pod_pin_dir(cookie))
    # counted once the removal is done (just after the record goes)
    assert _wait_for(lambda: agent.metric("interceptor_agent_reconciled_pods_total",
                                          action="removed") == removed + 1, 5)


def test_uninstall_leaves_nothing_and_a_later_del_still_succeeds(node):
    runtime, rt, agent, _ = node
    primary = open(runtime.primary_path(), "rb").read()
    assert agent.stop() == 0
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "uninstall", "--cni-bin-dir",
                        runtime.plugin_dir, "--cni-conf-dir", runtime.cni_conf], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(paths.PIN_ROOT) and not os.path.exists(paths.RUN_DIR)
    assert sorted(os.listdir(runtime.cni_conf)) == ["10-bridge.conflist"]
    assert open(runtime.primary_path(), "rb").read() == primary
    assert os.listdir(runtime.plugin_dir) == []
    # pods enrolled before the uninstall: their DELs run the primary's chain and succeed
    for sid in rt.sandbox_ids(ready_only=False):
        rt.stop_sandbox(sid)
        rt.remove_sandbox(sid)
    assert rt.sandbox_ids(ready_only=False) == []
    assert not os.path.exists(paths.RUN_DIR)
