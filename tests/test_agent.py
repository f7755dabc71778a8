"""The node agent (`interceptor agent`) on a real container runtime: containerd's CRI,
driven as the kubelet drives it (tests/crihelper.py), with bridge + host-local as the
primary CNI and interceptor-cni chained by the agent. The agent runs as its own process
and is stopped by SIGTERM, as a DaemonSet's pod would be."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from crihelper import Containerd
from interceptor import cni_chain, enrollment, ingress_policy, lab as labmod, loader, paths, podrecord
from interceptor.maps import Maps

pytestmark = pytest.mark.kernel
TESTS = os.path.dirname(os.path.abspath(__file__))
GATEWAY = "10.94.0.1"          # the bridge's address: a server outside every pod
SERVER_PORT = 18080


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

    def start(self):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interceptor.cli", "agent", "--cni-bin-dir", self.runtime.cni_bin,
             "--cni-conf-dir", self.runtime.cni_conf, "--listen", f"127.0.0.1:{self.port}",
             "--cri-socket", self.runtime.socket, "--reconcile-every", "1"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None, ""

    def wait_ready(self, ready=True, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = self.get("/readyz")
            if (code == 200) == ready and code is not None:
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
        if self.proc and self.proc.poll() is None:
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
    runtime = Containerd(os.path.join(workdir, "containerd")).start()
    rt = runtime.runtime()
    early = rt.run_sandbox("default", "early", "uid-early")
    skipped = rt.run_sandbox("kube-system", "dns", "uid-dns")
    agent = AgentProcess(runtime, workdir)
    try:
        yield runtime, rt, agent, {"early": early, "skipped": skipped}
    finally:
        agent.stop()
        from interceptor import agent as ag
        ag.uninstall(runtime.cni_bin, runtime.cni_conf, log=lambda msg: None)
        rt.close()
        runtime.stop()
        loader.unload()


def record_of(sandbox_id):
    return next((r for r in podrecord.all_records().values() if r.container_id == sandbox_id), None)


def test_the_agent_loads_chains_and_enrolls_the_pod_that_started_before_it(node):
    runtime, rt, agent, ids = node
    assert record_of(ids["early"]) is None and not loader.is_loaded()
    agent.start()
    agent.wait_ready()
    assert loader.is_loaded()
    owned = json.load(open(os.path.join(runtime.cni_conf, cni_chain.OWNED_NAME)))
    assert [p["type"] for p in owned["plugins"]] == ["bridge", "interceptor-cni"]
    assert owned["name"] == "k8s-pod-network"       # the primary's network, so DEL matches
    assert os.access(os.path.join(runtime.cni_bin, "interceptor-cni"), os.X_OK)
    deadline = time.monotonic() + 10
    while record_of(ids["early"]) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    rec = record_of(ids["early"])
    assert rec is not None and rec.pod == "default/early" and rec.complete, agent.log()
    assert rec.netns == rt.sandbox(ids["early"]).netns and not enrollment.verify(rec, rec.netns)
    assert record_of(ids["skipped"]) is None              # kube-system: left alone
    assert agent.metric("interceptor_agent_reconciled_pods_total", action="enrolled") == 1
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
    from interceptor import status
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
    assert "no primary CNI configuration" in agent.wait_ready(False)
    assert not os.path.exists(owned)
    with open(runtime.primary_path(), "w") as f:
        f.write(primary)
    agent.wait_ready()
    assert owned_has("disableGC")


def test_agent_restart_drops_no_request_and_pods_started_meanwhile_are_captured(node, tmp_path):
    runtime, rt, agent, _ = node
    agent.wait_ready()
    sid = rt.run_sandbox("shop", "client", "uid-client")
    netns_path = rt.sandbox(sid).netns
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(labmod.HAPROXY_CONFIG.format(uid=1337, gid=1337, outbound_port=15001, inbound_port=15006))
    hlog = open(tmp_path / "haproxy.log", "w")
    haproxy = subprocess.Popen(["nsenter", f"--net={netns_path}", "haproxy", "-db", "-f", str(cfg)],
                               stdout=hlog, stderr=subprocess.STDOUT)
    server = subprocess.Popen([sys.executable, os.path.join(TESTS, "apps.py"), "serve", str(SERVER_PORT)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    until = tmp_path / f"stop-{uuid.uuid4().hex[:6]}"
    load = None
    try:
        assert server.stdout.readline().strip() == "listening"
        labmod.wait_listening(netns_path, 15001)
        load = subprocess.Popen(["nsenter", f"--net={netns_path}", sys.executable,
                                 os.path.join(TESTS, "apps.py"), "load", GATEWAY, str(SERVER_PORT),
                                 "--until", str(until)], stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        assert agent.stop() == 0                    # SIGTERM: everything stays
        assert loader.is_loaded() and os.path.exists(os.path.join(runtime.cni_conf, cni_chain.OWNED_NAME))
        time.sleep(1)
        meanwhile = rt.run_sandbox("shop", "meanwhile", "uid-meanwhile")    # no agent running
        assert record_of(meanwhile) is not None and record_of(meanwhile).complete
        agent.start()
        agent.wait_ready()
        time.sleep(1)
        until.touch()
        result = json.loads(load.communicate(timeout=60)[0])
    finally:
        until.touch()
        if load and load.poll() is None:
            load.kill()
        for p in (haproxy, server):
            p.terminate()
            p.wait()
        hlog.close()
    print(f"requests through an agent restart: {result['ok']} ok, {result['failed']} failed")
    assert result["failed"] == 0 and result["ok"] > 50, result
    sessions = [line for line in open(tmp_path / "haproxy.log") if "frontend=outbound" in line]
    # every request went through the sidecar, which saw the original destination
    assert len(sessions) >= result["ok"] and all(f"dst={GATEWAY}:{SERVER_PORT}" in s for s in sessions)
    assert agent.metric("interceptor_agent_datapath_events_total", event="adopted") == 1


def test_a_datapath_of_another_version_is_left_in_place_and_not_ready(node):
    runtime, _, agent, ids = node
    agent.wait_ready()
    from interceptor import state
    node_state = state.read_json(paths.NODE_STATE)
    ours = node_state["datapath_version"]
    state.write_json(paths.NODE_STATE, dict(node_state, datapath_version="0123456789ab"))
    try:
        assert "datapath 0123456789ab is loaded" in agent.wait_ready(False)
        assert loader.is_loaded()
        rec = record_of(ids["early"])
        assert rec is not None and not enrollment.verify(rec, rec.netns)    # still captured
    finally:
        state.write_json(paths.NODE_STATE, dict(node_state, datapath_version=ours))
    agent.wait_ready()
    assert agent.metric("interceptor_agent_datapath_events_total", event="refused") == 1


def test_uninstall_leaves_nothing_and_a_later_del_still_succeeds(node):
    runtime, rt, agent, _ = node
    primary = open(runtime.primary_path(), "rb").read()
    assert agent.stop() == 0
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "uninstall", "--cni-bin-dir",
                        runtime.cni_bin, "--cni-conf-dir", runtime.cni_conf], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(paths.PIN_ROOT) and not os.path.exists(paths.RUN_DIR)
    assert sorted(os.listdir(runtime.cni_conf)) == ["10-bridge.conflist"]
    assert open(runtime.primary_path(), "rb").read() == primary
    assert sorted(os.listdir(runtime.cni_bin)) == ["bridge", "host-local", "loopback"]
    # pods enrolled before the uninstall: their DELs run the primary's chain and succeed
    for sid in rt.sandbox_ids(ready_only=False):
        rt.stop_sandbox(sid)
        rt.remove_sandbox(sid)
    assert rt.sandbox_ids(ready_only=False) == []
    assert not os.path.exists(paths.RUN_DIR)
