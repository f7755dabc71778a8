"""`interceptor bench cni`: how long the runtime waits for the plugin.

Runs the plugin exactly as installed on a node (the `cni install` wrapper) with the
runtime's environment and stdin: VERSION, then ADD and DEL for fresh network namespaces,
sequentially and concurrently. Each namespace has an eth0 (a veth, its peer in the same
namespace so the host is not touched), so ADD attaches the ingress filter as for a real
pod. Prints percentiles against the targets (ADD p99 < 50 ms,
VERSION < 30 ms); no pass/fail, the machine may be noisy.
"""
from concurrent.futures import ThreadPoolExecutor
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid

from pyroute2 import netns as pyr_netns

from .. import cni_install, loader

TARGETS_MS = {"VERSION": 30, "ADD": 50}


def _percentile(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class _Plugin:
    def __init__(self, workdir):
        bin_dir = os.path.join(workdir, "bin")
        conf_dir = os.path.join(workdir, "conf")
        os.makedirs(conf_dir)
        with open(os.path.join(conf_dir, "10-bench.conflist"), "w") as f:
            f.write('{"cniVersion":"1.0.0","name":"bench","plugins":[]}')
        cni_install.install(bin_dir, conf_dir)
        self.path = os.path.join(bin_dir, cni_install.PLUGIN_TYPE)
        self.log = os.path.join(workdir, "cni.log")

    def call(self, command, config, **env):
        e = {"CNI_COMMAND": command, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "CNI_PATH": "/opt/cni/bin", "INTERCEPTOR_CNI_LOG": self.log}
        for key in ("INTERCEPTOR_PIN_ROOT", "INTERCEPTOR_RUN_DIR"):
            if key in os.environ:
                e[key] = os.environ[key]
        e.update(env)
        started = time.perf_counter()
        p = subprocess.run([self.path], input=json.dumps(config), env=e, capture_output=True, text=True)
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


def run(sequential=100, concurrent=20, versions=50, echo=print):
    loaded_here = not loader.is_loaded()
    if loaded_here:
        loader.load()
    workdir = tempfile.mkdtemp(prefix="icbench-cni-")
    names = []
    results = {}
    try:
        plugin = _Plugin(workdir)
        results["VERSION"] = [plugin.call("VERSION", {"cniVersion": "1.0.0"}) for _ in range(versions)]

        def batch(label, count, parallel):
            batch_names = [f"icb{uuid.uuid4().hex[:10]}" for _ in range(count)]
            for n in batch_names:
                pyr_netns.create(n)
                names.append(n)
                subprocess.run(["ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name",
                                "eth0peer"], check=True, capture_output=True)
                subprocess.run(["ip", "-n", n, "link", "set", "eth0", "up"], check=True, capture_output=True)
            base = len(names) - count

            def add(i):
                return plugin.call("ADD", _config(base + i), **_env(batch_names[i]))

            def delete(i):
                return plugin.call("DEL", _config(base + i), **_env(batch_names[i]))

            with ThreadPoolExecutor(max_workers=parallel) as pool:
                results[f"ADD {label}"] = list(pool.map(add, range(count)))
                results[f"DEL {label}"] = list(pool.map(delete, range(count)))

        batch(f"sequential x{sequential}", sequential, 1)
        batch(f"concurrent x{concurrent}", concurrent, concurrent)
    finally:
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
    lines = [f"{'operation':<26}{'n':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}  target"]
    for label, samples in results.items():
        command = label.split()[0]
        target = TARGETS_MS.get(command)
        p99 = _percentile(samples, 99)
        verdict = ""
        if target:
            key = "p99" if command == "ADD" else "p50"
            value = p99 if command == "ADD" else statistics.median(samples)
            verdict = f"{key} < {target} ms: {'met' if value < target else 'NOT met'}"
        lines.append(f"{label:<26}{len(samples):>5}{statistics.median(samples):>9.1f}"
                     f"{_percentile(samples, 90):>9.1f}{p99:>9.1f}{max(samples):>9.1f}  {verdict}")
    return "\n".join(lines)
