"""`bench scale`: what the node's own operations cost as pods and connections grow.

Pods: N pods on one bridge (each a netns with an eth0), enrolled one after the other as
the plugin would (the ingress filter attached, capture on), then removed; each enroll's
and unenroll's time is recorded, and at log-spaced checkpoints the kernel memory of our
programs and maps (bpftool's memlock), how long `status` takes to collect and render,
and how long a metrics scrape takes (the DatapathCollector the agent serves).
Connections: the same operations with 1,000 to 100,000 entries in the connections' map
(`redirected`, what each intercepted connection leaves until it closes; entries written
from userspace, the shape the datapath writes), since removing a pod sweeps that map for
its connections.
"""
import ctypes
import json
import os
import statistics
import subprocess
import time

from interceptor import abi
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.datapath.maps import Maps
from interceptor.ops import enrollment, ensure, loader
from interceptor.harness import lab as labmod

CHECKPOINTS = (1, 2, 5, 10, 20, 50, 100, 200, 250)
CONNECTIONS = (1_000, 10_000, 100_000)
# the connections' map sized for the largest count (the default holds 65,536)
MAP_SIZES = {"redirected": 131_072}
NOBODY = 0x7E57C0DE00000001     # a netns cookie no namespace has: cookies count up from 1


def _memlock():
    """Bytes of kernel memory our programs and maps hold (bpftool's memlock)."""
    from interceptor.datapath.maps import LAYOUT
    from interceptor.datapath.programs import PROGRAMS
    ours = {p.name for p in PROGRAMS}

    def show(kind):
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True).stdout
        return json.loads(out or "[]")
    progs = sum(p.get("bytes_memlock", 0) for p in show("prog") if p.get("name") in ours)
    maps = sum(m.get("bytes_memlock", 0) for m in show("map") if m.get("name") in LAYOUT)
    return progs, maps


def _status_ms():
    from interceptor.ops import status
    started = time.perf_counter()
    status.render(status.collect(), wide=True)
    return (time.perf_counter() - started) * 1000


def _scrape_ms():
    from prometheus_client import CollectorRegistry, generate_latest

    from interceptor.agent.metrics import DatapathCollector
    registry = CollectorRegistry()
    registry.register(DatapathCollector())
    started = time.perf_counter()
    generate_latest(registry)
    return (time.perf_counter() - started) * 1000


def _checkpoint(n):
    progs, maps = _memlock()
    return {"pods": n, "status_ms": _status_ms(), "scrape_ms": _scrape_ms(),
            "prog_memlock": progs, "map_memlock": maps}


def pods(max_pods, progress):
    """{"enroll_ms": [...], "unenroll_ms": [...], "checkpoints": [...]}"""
    out = {"enroll_ms": [], "unenroll_ms": [], "checkpoints": []}
    with labmod.Lab(prefix=f"ics{os.getpid() % 10000}", net=74) as lab:
        made = [lab.add_pod(f"p{i}") for i in range(max_pods)]
        out["checkpoints"].append(_checkpoint(0))
        for i, pod in enumerate(made, 1):
            started = time.perf_counter()
            enrollment.enroll(pod.netns_path, PodSettings(), pod=f"scale/{pod.name}",
                              container_id=f"scale{i}", ifname="eth0")
            out["enroll_ms"].append((time.perf_counter() - started) * 1000)
            if i in CHECKPOINTS or i == max_pods:
                out["checkpoints"].append(_checkpoint(i))
                c = out["checkpoints"][-1]
                progress(f"scale: {i} pods: enroll {out['enroll_ms'][-1]:.1f} ms, status "
                         f"{c['status_ms']:.0f} ms, scrape {c['scrape_ms']:.0f} ms, programs "
                         f"{c['prog_memlock'] / 1024:.0f} KiB")
        for pod in reversed(made):
            started = time.perf_counter()
            enrollment.unenroll(netns_path=pod.netns_path)
            out["unenroll_ms"].append((time.perf_counter() - started) * 1000)
        out["unenroll_ms"].reverse()         # index i: the unenroll that left i pods
    return out


def _fake_connection(i):
    """The i-th entry of a connection of nobody's, in the connections' map's shape."""
    key = abi.SockTuple()
    ctypes.memmove(ctypes.addressof(key), i.to_bytes(4, "little") * (ctypes.sizeof(key) // 4),
                   ctypes.sizeof(key))
    value = abi.OrigDst(port=8080, family=2, direction=abi.DIR_OUTBOUND, netns_cookie=NOBODY)
    return key, value


def connections(progress, counts=CONNECTIONS, repeat=5):
    """Enroll and unenroll time with counts entries in `redirected` (of another pod)."""
    out = []
    filled = 0
    with labmod.Lab(prefix=f"icc{os.getpid() % 10000}", net=73) as lab, Maps() as maps:
        pod = lab.add_pod("p")
        capacity = maps.redirected.info().max_entries
        for count in [c for c in counts if c <= capacity]:
            for i in range(filled, count):
                maps.redirected.put(*_fake_connection(i))
            filled = count
            enroll_ms, unenroll_ms = [], []
            for _ in range(repeat):
                started = time.perf_counter()
                enrollment.enroll(pod.netns_path, PodSettings(), pod="scale/p")
                enroll_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                enrollment.unenroll(netns_path=pod.netns_path)
                unenroll_ms.append((time.perf_counter() - started) * 1000)
            row = {"connections": count, "enroll_ms": statistics.median(enroll_ms),
                   "unenroll_ms": statistics.median(unenroll_ms), "status_ms": _status_ms(),
                   "scrape_ms": _scrape_ms()}
            out.append(row)
            progress(f"scale: {count} connections: enroll {row['enroll_ms']:.1f} ms, unenroll "
                     f"{row['unenroll_ms']:.1f} ms, status {row['status_ms']:.0f} ms, scrape "
                     f"{row['scrape_ms']:.0f} ms")
        for i in range(filled):
            maps.redirected.delete(_fake_connection(i)[0])
    return out


def run(max_pods, progress, connection_counts=CONNECTIONS):
    loaded_here = not node_state.is_loaded()
    if loaded_here:
        ensure.load(map_sizes=MAP_SIZES)
    try:
        return {"pods": pods(max_pods, progress), "connections": connections(progress, connection_counts)}
    finally:
        if loaded_here:
            loader.unload()


def render(results):
    lines = ["== scale: the node's operations as pods grow (enroll/unenroll: the pods around that "
             "count; memory: our programs and maps, bpftool memlock)",
             f"{'pods':>6}{'enroll ms':>11}{'unenroll ms':>13}{'status ms':>11}{'scrape ms':>11}"
             f"{'programs KiB':>14}{'maps MiB':>10}"]
    p = results["pods"]
    for c in p["checkpoints"]:
        n = c["pods"]
        around = slice(max(0, n - 5), n) if n else slice(0, 0)
        enroll = p["enroll_ms"][around]
        unenroll = p["unenroll_ms"][around]
        lines.append(f"{n:>6}{statistics.median(enroll) if enroll else 0:>11.1f}"
                     f"{statistics.median(unenroll) if unenroll else 0:>13.1f}{c['status_ms']:>11.0f}"
                     f"{c['scrape_ms']:>11.0f}{c['prog_memlock'] / 1024:>14.0f}{c['map_memlock'] / 2**20:>10.1f}")
    if results.get("connections"):
        lines += ["", "== scale: with intercepted connections live (entries in `redirected`)",
                  f"{'connections':>12}{'enroll ms':>11}{'unenroll ms':>13}{'status ms':>11}{'scrape ms':>11}"]
        for row in results["connections"]:
            lines.append(f"{row['connections']:>12}{row['enroll_ms']:>11.1f}{row['unenroll_ms']:>13.1f}"
                         f"{row['status_ms']:>11.0f}{row['scrape_ms']:>11.0f}")
    return "\n".join(lines)


def plot(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = results["pods"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    n = range(1, len(p["enroll_ms"]) + 1)
    a.plot(n, p["enroll_ms"], ".", markersize=3, label="enroll (ADD's work)")
    a.plot(n, p["unenroll_ms"], ".", markersize=3, label="unenroll (DEL's work)")
    cp = [c for c in p["checkpoints"] if c["pods"]]
    a.plot([c["pods"] for c in cp], [c["status_ms"] for c in cp], "o-", label="status")
    a.plot([c["pods"] for c in cp], [c["scrape_ms"] for c in cp], "s-", label="metrics scrape")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("enrolled pods")
    a.set_ylabel("ms")
    a.set_title("Per-operation time as pods grow")
    a.legend()
    b.plot([c["pods"] for c in cp], [c["prog_memlock"] / 1024 for c in cp], "o-", label="programs")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("enrolled pods")
    b.set_ylabel("KiB (bpftool memlock)")
    b.set_title(f"Kernel memory of programs (maps: {cp[-1]['map_memlock'] / 2**20:.0f} MiB, preallocated)")
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scale.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import sys
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "."
    results = run(int(sys.argv[1]) if len(sys.argv) > 1 else 250, lambda m: print(m, flush=True))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "scale.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(render(results))
    plot(results, out_dir)
