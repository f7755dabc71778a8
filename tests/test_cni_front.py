"""The plugin as the agent installs it (interceptor/cni/front.c, static, nothing from the
host) and the agent's end of it (cni/server.py): requests answered in the running
`interceptor agent`; whenever the agent cannot answer (not running, killed, stalled, or
serving another pin root or run dir) ADD and CHECK fail closed with CNI error 11 and DEL
succeeds, and the agent's reconcile cleans up after it once it is back. Which process
answered is told by the pid in the plugin's log line.
"""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile

import pytest
from pyroute2 import netns as pyr_netns

from cnihelper import config, container_env, run
from interceptor import paths, store
from interceptor.kernel import netns
from interceptor.pod import podrecord
from interceptor.ops import loader
from interceptor.cni import install as cni_install, plugin as cni, server as cni_server

pytestmark = pytest.mark.kernel


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """`interceptor agent` on a conf dir of its own (no CRI: nothing to reconcile)."""

    def __init__(self, workdir):
        self.bin_dir = os.path.join(workdir, "bin")
        self.conf_dir = os.path.join(workdir, "conf")
        os.makedirs(self.conf_dir)
        with open(os.path.join(self.conf_dir, "10-test.conflist"), "w") as f:
            f.write('{"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": "bridge"}]}')
        self.port = free_port()
        self.log_path = os.path.join(workdir, "agent.log")
        self.proc = None

    @property
    def plugin(self):
        return os.path.join(self.bin_dir, cni_install.PLUGIN_TYPE)

    def start(self):
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "interceptor.cli", "agent", "--cni-bin-dir", self.bin_dir,
                 "--cni-conf-dir", self.conf_dir, "--listen", f"127.0.0.1:{self.port}",
                 "--reconcile-every", "1"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.ready():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)
        return self

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status == 200 and os.path.exists(cni_server.socket_path())
        except OSError:
            return False

    def metric(self, command, answer):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            body = r.read().decode()
        want = f'interceptor_agent_cni_requests_total{{answer="{answer}",command="{command}"}} '
        return next((float(line.split()[-1]) for line in body.splitlines() if line.startswith(want)), 0.0)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def log(self):
        with open(self.log_path) as f:
            return f.read()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    loader.unload()
    the_agent = Agent(str(tmp_path_factory.mktemp("front"))).start()
    try:
        yield the_agent
    finally:
        the_agent.stop()
        if the_agent.proc.poll() is None:       # stopped (SIGSTOP) by a failed test
            the_agent.proc.send_signal(signal.SIGCONT)
            the_agent.stop()
        loader.unload()


@pytest.fixture
def pod_netns():
    """A namespace with an eth0 (its peer inside it too), as a pod's after the bridge."""
    name = f"icf{uuid.uuid4().hex[:8]}"
    pyr_netns.create(name)
    subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                   check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True)
    yield f"/run/netns/{name}"
    pyr_netns.remove(name)


def answered_by(log_path, text):
    """The pid of the process that logged the last line saying text."""
    with open(log_path) as f:
        pids = re.findall(rf"\[(\d+)\] [^\n]*{re.escape(text)}", f.read())
    return int(pids[-1]) if pids else None


def test_the_installed_plugin_is_the_static_front_alone_needing_no_interpreter(agent):
    with open(agent.plugin, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF"
    out = subprocess.run(["file", "-b", agent.plugin], capture_output=True, text=True).stdout
    assert "statically linked" in out or "static-pie" in out, out
    assert b"python" not in data.lower()            # no interpreter to look for
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(agent.plugin)
    assert cni_install.installed_fingerprint(agent.plugin) == cni_install.fingerprint_of_this(
        cni_install.Runner.AGENT)


def assert_not_ready(rc, doc, why):
    """ADD (or CHECK) failed closed: CNI error 11, try again later, saying why."""
    assert rc == 1 and doc["code"] == 11 and "node agent is not ready" in doc["msg"], doc
    assert why in doc["details"], doc


def test_with_the_agent_up_the_agent_answers(agent, pod_netns, tmp_path):
    log = str(tmp_path / "cni.log")
    env = container_env(pod_netns)
    before = agent.metric("ADD", "answered")
    rc, doc = run(agent.plugin, log, "VERSION", {"cniVersion": "0.4.0"})
    assert (rc, doc["cniVersion"]) == (0, "0.4.0")
    rc, doc = run(agent.plugin, log, "ADD", config(), **env)
    assert rc == 0 and doc["ips"], doc
    assert answered_by(log, env["CNI_CONTAINERID"]) == agent.proc.pid
    assert podrecord.read(netns.cookie_of(pod_netns)).complete
    assert run(agent.plugin, log, "CHECK", config(), **env) == (0, None)
    assert run(agent.plugin, log, "DEL", config(), **env) == (0, None)
    assert answered_by(log, env["CNI_CONTAINERID"]) == agent.proc.pid
    assert podrecord.all_records() == {}
    assert agent.metric("ADD", "answered") == before + 1
    # a malformed request is answered as the plugin answers it: CNI error JSON, code 6
    rc, doc = run(agent.plugin, log, "ADD", stdin="{not json", **env)
    assert rc == 1 and doc["code"] == 6
    assert "Traceback" not in open(log).read()


def test_concurrent_requests_are_answered_on_threads_of_the_agent(agent, tmp_path):
    """A burst of ADDs, then of DELs, at once: each answered by the agent, each pod
    complete, nothing left (state files are written by several threads at a time)."""
    from concurrent.futures import ThreadPoolExecutor
    log = str(tmp_path / "cni.log")
    names = [f"icf{uuid.uuid4().hex[:8]}" for _ in range(16)]
    for name in names:
        pyr_netns.create(name)
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                       check=True)
    envs = [container_env(f"/run/netns/{name}") for name in names]
    try:
        with ThreadPoolExecutor(len(envs)) as pool:
            adds = list(pool.map(lambda ie: run(agent.plugin, log, "ADD", config(ip=f"10.66.2.{ie[0] + 2}"),
                                                **ie[1]), enumerate(envs)))
            assert all(rc == 0 for rc, _ in adds), adds
            assert {answered_by(log, e["CNI_CONTAINERID"]) for e in envs} == {agent.proc.pid}
            records = podrecord.all_records().values()
            assert len(records) == len(envs) and all(r.complete for r in records)
            dels = list(pool.map(lambda e: run(agent.plugin, log, "DEL", config(), **e), envs))
            assert all(d == (0, None) for d in dels), dels
        assert podrecord.all_records() == {}
        assert not [n for n in os.listdir(paths.POD_STATE) if n.startswith(".")]   # no temporaries
    finally:
        for name in names:
            pyr_netns.remove(name)


def test_a_request_for_another_run_dir_fails_closed(agent, pod_netns, tmp_path):
    log = str(tmp_path / "cni.log")
    env = container_env(pod_netns)
    other = str(tmp_path / "other-run")
    rc, doc = run(agent.plugin, log, "ADD", config(runDir=other), **env)
    assert_not_ready(rc, doc, "serves another pin root or run dir")
    assert agent.metric("ADD", "not_mine") >= 1
    assert run(agent.plugin, log, "DEL", config(runDir=other), **env) == (0, None)
    assert podrecord.all_records() == {}


def test_a_stalled_agent_fails_add_closed_after_the_timeout_and_the_queued_add_is_dropped(agent, pod_netns,
                                                                                           tmp_path):
    log = str(tmp_path / "cni.log")
    env = container_env(pod_netns)
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        rc, doc = run(agent.plugin, log, "ADD", config(), INTERCEPTOR_CNI_AGENT_TIMEOUT="1", **env)
        took = time.monotonic() - started
        assert_not_ready(rc, doc, "did not answer in time")
        assert took < 20, took          # the timeout, not the agent, ended the wait
        # the runtime tears the sandbox down: DEL succeeds without the agent
        assert run(agent.plugin, log, "DEL", config(), INTERCEPTOR_CNI_AGENT_TIMEOUT="1", **env) == (0, None)
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    # the ADD queued on the stalled agent's socket is dropped once it runs again, not
    # carried out after the DEL (which would leave the pod enrolled)
    deadline = time.monotonic() + 10
    while agent.metric("ADD", "expired") < 1:
        assert time.monotonic() < deadline, "the queued ADD was not dropped"
        time.sleep(0.1)
    time.sleep(0.3)
    assert podrecord.all_records() == {}


def test_a_request_waiting_for_the_node_lock_past_its_deadline_is_dropped(agent, pod_netns, tmp_path):
    """The agent began the ADD in time, but the node lock was held past the front's
    deadline (here by the test; in life, say, a long unenroll or the agent stalled): the
    front fails the ADD closed, and the agent's ADD, once it gets the lock, is dropped,
    not carried out after whatever the runtime did next."""
    import threading
    log = str(tmp_path / "cni.log")
    env = container_env(pod_netns)
    expired = agent.metric("ADD", "expired")
    answered = agent.metric("ADD", "answered")
    result = {}
    with store.node_lock():
        adder = threading.Thread(target=lambda: result.update(
            out=run(agent.plugin, log, "ADD", config(), INTERCEPTOR_CNI_AGENT_TIMEOUT="1", **env)))
        adder.start()
        time.sleep(2.5)         # the front's deadline passes while the agent waits
    adder.join(60)
    assert_not_ready(*result["out"], "did not answer in time")
    deadline = time.monotonic() + 10
    while agent.metric("ADD", "expired") < expired + 1:
        assert time.monotonic() < deadline, "the agent's ADD was not dropped"
        time.sleep(0.1)
    assert agent.metric("ADD", "answered") == answered
    time.sleep(0.3)
    assert podrecord.all_records() == {}


def test_without_the_agent_add_fails_closed_version_and_del_answer_and_a_restart_takes_over(agent, pod_netns,
                                                                                          tmp_path):
    log = str(tmp_path / "cni.log")
    env = container_env(pod_netns)
    agent.proc.kill()
    agent.proc.wait()
    assert os.path.exists(cni_server.socket_path())      # nobody listens on it now
    rc, doc = run(agent.plugin, log, "ADD", config(), **env)
    assert_not_ready(rc, doc, "no node agent listens")
    rc, doc = run(agent.plugin, log, "CHECK", config(), **env)
    assert_not_ready(rc, doc, "no node agent listens")
    rc, doc = run(agent.plugin, log, "STATUS", config(version="1.1.0", prev=False))
    assert rc == 1 and doc["code"] == 50, doc
    rc, doc = run(agent.plugin, log, "VERSION", {"cniVersion": "0.4.0"})
    assert rc == 0 and doc == {"cniVersion": "0.4.0", "supportedVersions": cni.SUPPORTED_VERSIONS}, doc
    assert run(agent.plugin, log, "DEL", config(), **env) == (0, None)
    assert podrecord.all_records() == {}
    # an agent killed between binding its socket and renaming it into place left this
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{cni_server.socket_path()}.{gone.pid}"
    open(stale, "w").close()
    agent.start()                                          # takes the socket over
    assert not os.path.exists(stale)
    rc, doc = run(agent.plugin, log, "ADD", config(), **env)   # the kubelet's retry
    assert rc == 0, doc
    assert answered_by(log, env["CNI_CONTAINERID"]) == agent.proc.pid
    assert run(agent.plugin, log, "DEL", config(), **env) == (0, None)
    assert podrecord.all_records() == {}


def test_a_del_while_the_agent_is_away_is_cleaned_up_by_its_reconcile(agent, tmp_path):
    """DEL succeeds without the agent so a pod can always be deleted; what the pod left
    (its record, its entries) goes once the agent is back and finds its netns gone."""
    log = str(tmp_path / "cni.log")
    name = f"icf{uuid.uuid4().hex[:8]}"
    pyr_netns.create(name)
    path = f"/run/netns/{name}"
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                       check=True)
        env = container_env(path)
        rc, doc = run(agent.plugin, log, "ADD", config(), **env)
        assert rc == 0, doc
        assert len(podrecord.all_records()) == 1
        agent.stop()
    finally:
        pyr_netns.remove(name)
    assert run(agent.plugin, log, "DEL", config(), **env) == (0, None)
    assert len(podrecord.all_records()) == 1                # left for the agent
    agent.start()
    deadline = time.monotonic() + 10
    while podrecord.all_records():
        assert time.monotonic() < deadline, "the agent's reconcile left the record"
        time.sleep(0.2)


def test_a_stopped_agent_removes_its_socket(agent):
    agent.stop()
    assert not os.path.exists(cni_server.socket_path())
    assert os.path.exists(paths.PIN_ROOT)                 # the datapath stays, as ever
    agent.start()
