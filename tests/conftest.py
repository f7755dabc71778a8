"""Fixtures for tests against the real kernel: the loaded datapath, pods in network
namespaces, the test apps and sidecars.

Tests use their own pin root and state dir, so a datapath loaded on the machine for real
is neither used nor disturbed by a test run.
"""
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

os.environ.setdefault("INTERCEPTOR_PIN_ROOT", "/sys/fs/bpf/interceptor-test")
os.environ.setdefault("INTERCEPTOR_RUN_DIR", "/run/interceptor-test")

import pytest  # noqa: E402

from interceptor import abi, paths
from interceptor.pod.podspec import PodSettings  # noqa: E402
from interceptor.datapath import node_state
from interceptor.datapath.maps import Maps  # noqa: E402
from interceptor.ops import ensure
from interceptor.ops import counters, doctor, enrollment, loader  # noqa: E402
from interceptor.harness import lab as labmod

TESTS = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(TESTS, "apps.py")
SIDECAR = os.path.join(TESTS, "sidecar.py")
SERVER_PORT = 8080


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        for item in items:
            if "kernel" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs root and the real kernel"))


# The modes a behaviour is proven in: name -> (load --mode, features doctor must report
# absent). hybrid: sk_lookup reported absent, so inbound runs on rules, outbound on eBPF.
MODES = {
    "ebpf": ("ebpf", ""),
    "nftables": ("nftables", ""),
    "iptables": ("iptables", ""),
    "hybrid": ("auto", "sk_lookup"),
}


def load_without(disabled="", refused="", **load_args):
    """ensure.load with doctor told that these features (comma-separated) are absent,
    and the kernel's verifier answer for these programs turned into a refusal, to
    exercise a fallback on a kernel that has them."""
    from interceptor.datapath.build import REFUSE_ENV
    old = {env: os.environ.get(env) for env in (doctor.DISABLE_ENV, REFUSE_ENV)}
    os.environ[doctor.DISABLE_ENV] = disabled
    os.environ[REFUSE_ENV] = refused
    try:
        return ensure.load(**load_args)
    finally:
        for env, value in old.items():
            if value is None:
                del os.environ[env]
            else:
                os.environ[env] = value


@contextlib.contextmanager
def loaded(disabled="", refused="", **load_args):
    """The datapath loaded afresh (features in disabled reported absent, programs in
    refused refused), unloaded after, and checked gone."""
    loader.unload()
    load_without(disabled, refused, **load_args)
    yield node_state.node_plan()
    loader.unload()
    assert not os.path.exists(paths.PIN_ROOT), "unload left pins behind"


@contextlib.contextmanager
def pods_lab(prefix, net):
    """A lab of pods whose enrollments are removed with it."""
    with labmod.Lab(prefix=f"{prefix}{uuid.uuid4().hex[:5]}", net=net) as the_lab:
        yield the_lab
        for pod in the_lab.pods.values():
            enrollment.unenroll(netns_path=pod.netns_path)


@pytest.fixture(scope="module")
def datapath():
    """The datapath loaded for one test module, unloaded after it (and checked gone)."""
    with loaded(bypass=True):     # the suite exercises the bypass too
        yield


@pytest.fixture
def lab():
    with pods_lab("ict", 77) as the_lab:
        yield the_lab


def start_server(pod, port=SERVER_PORT):
    proc = pod.spawn(sys.executable, APPS, "serve", str(port),
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def start_http_app(port, netns_path=None):
    """tests/apps.py's HTTP server (it answers with the peer and local address it saw) on
    port, in the namespace at netns_path (a runtime's sandbox) or the caller's; returns
    it once it listens. The caller ends it by its PID."""
    prefix = ["nsenter", f"--net={netns_path}"] if netns_path else []
    proc = subprocess.Popen([*prefix, sys.executable, APPS, "http", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def start_sidecar(lab, pod, outbound_port=abi.OUTBOUND_PORT, inbound_port=abi.INBOUND_PORT):
    """The Python test proxy (IPv4 and IPv6), as uid/gid 1337. Returns its log path."""
    log = os.path.join(lab.workdir, f"sidecar-{pod.name}.log")
    open(log, "w").close()
    pod.spawn(sys.executable, SIDECAR, "--log", log, "--outbound-port", str(outbound_port),
              "--inbound-port", str(inbound_port), stderr=subprocess.DEVNULL)
    labmod.wait_listening(pod, outbound_port)
    labmod.wait_listening(pod, inbound_port)
    return log


def client(pod, host, port=SERVER_PORT, nbytes=None, uid=None, gid=None, timeout=60, framed=False):
    argv = [sys.executable, APPS, "connect", str(host), str(port)] + (["--framed"] if framed else [])
    if nbytes is not None:
        argv += ["--bytes", str(nbytes)]
    if uid is not None:
        argv += ["--uid", str(uid)]
    if gid is not None:
        argv += ["--gid", str(gid)]
    out = pod.run(*argv, timeout=timeout).stdout
    return json.loads(out)


def log_lines(path, settle=0.3):
    """The proxy log's lines; waits briefly for the last connection's line to land."""
    time.sleep(settle)
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def sidecar_entries(path, settle=0.3):
    return [json.loads(line) for line in log_lines(path, settle)]


def _all_counters(pod):
    """Counters of the pod whatever serves it (stats map, rules), summed over CPUs."""
    from interceptor.kernel import netns
    from interceptor.pod import podrecord
    cookie = netns.cookie_of(pod.netns_path)
    records = podrecord.all_records()
    if node_state.node_plan().uses_bpf:
        with Maps() as maps:
            return counters.by_pod(maps, records).get(cookie, {})
    return counters.by_pod(None, records).get(cookie, {})


def pod_counters(pod):
    """{reason label: count} for the pod."""
    return {k: v["count"] for k, v in _all_counters(pod).items()}


def pod_bytes(pod, label):
    return _all_counters(pod).get(label, {}).get("bytes", 0)


def enroll(pod, **settings):
    return enrollment.enroll(pod.netns_path, PodSettings(**settings),
                             pod=f"test/{pod.name}")


def publish_figures(record):
    """A reliability scenario's figures (one JSON line), for `make reliability`, which
    sets $INTERCEPTOR_RELIABILITY_OUT and renders docs/reliability.md from them."""
    out = os.environ.get("INTERCEPTOR_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def killed_after(argv, delay):
    """Run argv; SIGKILL it after delay seconds unless it ended. Returns whether it was
    killed (a runtime's timeout does exactly this to a CNI plugin)."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return True


class Background:
    """Threads that run until the block ends (self.stop is set), then are joined.
    Subclasses fill self.threads; daemon threads (servers blocked in accept) are left."""

    def __init__(self):
        self.stop = threading.Event()
        self.threads = []

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            if not t.daemon:
                t.join()


# --- what the kernel and the node hold, counted outside our own bookkeeping -----------
# interceptor.ops.residue's (selfcheck uses them too), under the names tests import
from interceptor.ops import residue  # noqa: E402
bpftool, live_objects, wait_gone = residue.bpftool, residue.live_objects, residue.wait_gone


def node_fingerprint(*other_dirs):
    """Pins (by inode: the same object at the same place) and the files of the run dir
    and of other_dirs (by content): what a refused command must leave as it was. The
    operation counters are left out (a refused operation is counted)."""
    import hashlib
    seen = {}
    for root in (paths.PIN_ROOT, paths.RUN_DIR, *other_dirs):
        for d, _, files in os.walk(root):
            for name in files:
                path = os.path.join(d, name)
                if root == paths.PIN_ROOT:
                    seen[path] = os.lstat(path).st_ino
                elif name != "opstats.json":
                    with open(path, "rb") as f:
                        seen[path] = hashlib.sha256(f.read()).hexdigest()
    return seen
