"""`interceptor bench cni`: how long the runtime waits for the plugin.

Runs the plugin exactly as a node has it, with the runtime's environment and stdin:
VERSION, then ADD and DEL for fresh network namespaces, sequentially and concurrently.
Each namespace has an eth0 (a veth, its peer in the same namespace so the host is not
touched), so ADD attaches the ingress filter as for a real pod. Two modes, the two
runners a plugin is installed with (cni/install.py), interleaved round by round:
`agent` (the static front the node agent installs; a real `interceptor agent` answers
each request) and `python` (`interceptor cni install --runner python`, a node without
an agent: the plugin runs itself under Python). Prints percentiles against the targets;
no pass/fail, the machine may be noisy.
"""
from concurrent.futures import ThreadPoolExecutor
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

from pyroute2 import netns as pyr_netns

from interceptor.datapath import node_state
from interceptor.ops import ensure, loader
from interceptor.cni import install as cni_install, server as cni_server

# (operation, percentile) -> target in ms (issue: pod start)
TARGETS_MS = {"VERSION": (99, 10), "ADD sequential": (99, 25), "ADD concurrent": (99, 250)}
MODES = ("agent", "python")


def _percentile(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class _Agent:
    """A real `interceptor agent` on conf and bin dirs of the bench's own."""

    def __init__(self, workdir):
        self.bin_dir = os.path.join(workdir, "bin")
        self.conf_dir = os.path.join(workdir, "conf")
        os.makedirs(self.conf_dir)
        with open(os.path.join(self.conf_dir, "10-bench.conflist"), "w") as f:
            f.write('{"cniVersion":"1.0.0","name":"bench","plugins":[{"type":"bridge"}]}')
        self.log = open(os.path.join(workdir, "agent.log"), "a")
        self.proc = None
        self.plugin = os.path.join(self.bin_dir, cni_install.PLUGIN_TYPE)

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return          # running already (the round before ended in this mode)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "interceptor.cli", "agent", "--cni-bin-dir", self.bin_dir,
             "--cni-conf-dir", self.conf_dir, "--listen", f"127.0.0.1:{port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200 and os.path.exists(cni_server.socket_path()):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the agent did not become ready (log: {self.log.name})")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def close(self):
        self.stop()
        self.log.close()


def _call(plugin, command, config, **env):
    e = {"CNI_COMMAND": command, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
         "CNI_PATH": "/opt/cni/bin", "INTERCEPTOR_CNI_LOG": os.devnull}
    for key in ("INTERCEPTOR_PIN_ROOT", "INTERCEPTOR_RUN_DIR"):
        if key in os.environ:
            e[key] = os.environ[key]
    e.update(env)
    started = time.perf_counter()
    p = subprocess.run([plugin], input=json.dumps(config), env=e, capture_output=True, text=True)
    elapsed = (time.perf_counter() - started) * 1000
    if p.returncode != 0:
        raise RuntimeError(f"{command} failed: {p.stdout.strip()} {p.stderr.strip()[-300:]}")
    return elapsed


def _config(i):
    return {"cniVersion": "1.0.0", "name": "bench", "type": "interceptor-cni",
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                           "ips": [{"address": f"10.250.{i // 250}.{i % 250 + 2}/16"}]}}


def _env(name):
    return {"CNI_CONTAINERID": name, "CNI_NETNS": f"/run/netns/{name}", "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=bench;K8S_POD_NAME={name}"}


def _namespaces(count):
    names = [f"icb{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for n in names:
        pyr_netns.create(n)
        subprocess.run(["ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name",
                        "eth0peer"], check=True, capture_output=True)
        subprocess.run(["ip", "-n", n, "link", "set", "eth0", "up"], check=True, capture_output=True)
    return names


def _batch(plugin, names, parallel, results, label):
    def add(i):
        return _call(plugin, "ADD", _config(i), **_env(names[i]))

    def delete(i):
        return _call(plugin, "DEL", _config(i), **_env(names[i]))

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results.setdefault(f"ADD {label}", []).extend(pool.map(add, range(len(names))))
        results.setdefault(f"DEL {label}", []).extend(pool.map(delete, range(len(names))))


def run(sequential=100, concurrent=40, versions=50, rounds=1, echo=print):
    """{mode: {operation: [ms]}}: the agent answering, and the plugin on its own."""
    loaded_here = not node_state.is_loaded()
    if loaded_here:
        ensure.load()
    workdir = tempfile.mkdtemp(prefix="icbench-cni-")
    agent = _Agent(workdir)
    python_bin = os.path.join(workdir, "python-bin")
    cni_install.install_binary(python_bin, cni_install.Runner.PYTHON)
    plugins = {"agent": agent.plugin, "python": os.path.join(python_bin, cni_install.PLUGIN_TYPE)}
    results = {mode: {} for mode in MODES}
    names = []
    try:
        for r in range(rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                if mode == "agent":
                    agent.start()
                else:
                    agent.stop()
                out, plugin = results[mode], plugins[mode]
                out.setdefault("VERSION", []).extend(
                    _call(plugin, "VERSION", {"cniVersion": "1.0.0"}) for _ in range(versions))
                seq, conc = _namespaces(sequential), _namespaces(concurrent)
                names += seq + conc
                _batch(plugin, seq, 1, out, "sequential")
                _batch(plugin, conc, concurrent, out, "concurrent")
    finally:
        agent.close()
        for n in names:
            try:
                pyr_netns.remove(n)
            except OSError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)
        if loaded_here:
            loader.unload()
    echo(render(results))
    return results


def render(results):
    if results and "VERSION" in results:         # results of before the agent mode
        results = {"python": results}
    results = {("python" if mode == "plugin" else mode): ops for mode, ops in results.items()}  # earlier name
    lines = [f"{'mode':<8}{'operation':<17}{'n':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
             f"{'max ms':>9}  target"]
    for mode, ops in results.items():
        for label, samples in ops.items():
            target = TARGETS_MS.get(label)
            verdict = ""
            if target:
                q, limit = target
                value = _percentile(samples, q)
                verdict = f"p{q} <= {limit} ms: {'met' if value <= limit else 'NOT met'}"
            lines.append(f"{mode:<8}{label:<17}{len(samples):>5}{statistics.median(samples):>9.1f}"
                         f"{_percentile(samples, 90):>9.1f}{_percentile(samples, 99):>9.1f}"
                         f"{max(samples):>9.1f}  {verdict}")
    return "\n".join(lines)
