"""New connections per second, and kernel memory, as live intercepted connections grow.

    python -m interceptor.harness.bench.conns [ROUNDS] [OUT_DIR] [COUNTS]

One node with pairs of pods (a holder and a server, each with its sidecar: HAProxy, uid
1337; the server also runs the HTTP app) and a load pod. For each count N of live
connections and each mode (iptables REDIRECT rules, the eBPF datapath without bypass),
interleaved round by round, on fresh pods: the holders open N keep-alive connections
through both sidecars (app -> sidecar -> sidecar -> app), get an answer on each and keep
them idle; then wrk (c=8, Connection: close) from the load pod to the first server
measures new connections per second for 5 s. Kernel memory is read before and after the
connections open: slab (sockets, conntrack entries, socket storage) and TCP buffers.

A pair carries at most PER_PAIR connections: a process here may hold 20,000 files (the
hard limit, which root cannot raise on this machine kind), and a sidecar holds two per
connection.
"""
import json
import os
import statistics
import subprocess
import sys
import time

if __name__ == "__main__":
    # its own pins and state, as `interceptor bench`: a datapath loaded for real on this
    # node is left alone (set before interceptor.paths reads them)
    os.environ.setdefault("INTERCEPTOR_PIN_ROOT", "/sys/fs/bpf/interceptor-bench")
    os.environ.setdefault("INTERCEPTOR_RUN_DIR", "/run/interceptor-bench")

from interceptor.pod.podspec import PodSettings
from interceptor.ops import enrollment, ensure, loader
from interceptor.harness import lab as labmod
from interceptor.harness.bench import report, tools, topology

COUNTS = (1_000, 10_000, 100_000)
MODES = ("iptables", "ebpf-nobypass")
PER_PAIR = 8_000
MAXCONN = 9_000               # PER_PAIR, the load and some slack: 2 files each
SECONDS = 5
# the connections' map holds an entry per redirected socket (the app's, and the proxy's
# accepted one of a steered inbound connection): sized for the largest count
MAP_SIZES = {"redirected": 262_144}
IDLE = "600s"
_LOAD = {"iptables": dict(mode="iptables"), "ebpf-nobypass": dict(mode="ebpf", map_sizes=MAP_SIZES)}


def _kernel_memory():
    """(slab bytes, TCP buffer bytes) of the whole machine."""
    with open("/proc/meminfo") as f:
        slab = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Slab:"))
    with open("/proc/net/sockstat") as f:
        tcp = next(line.split() for line in f if line.startswith("TCP:"))
    return slab, int(tcp[tcp.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")


class _Pods(topology.Topology):
    """Holder and server pairs enough for count connections, and the load pod."""

    def __init__(self, count):          # not Topology's: other pods, other limits
        self.labs, self.pids, self.server_node, self.cross_node = [], {}, None, False
        try:
            self.labs = [labmod.Lab(prefix=f"icn{os.getpid() % 10000}", net=72)]
            pairs = max(1, -(-count // PER_PAIR))
            self.servers = [self.lab.add_pod(f"s{i}") for i in range(pairs)]
            self.holders = [self.lab.add_pod(f"h{i}") for i in range(pairs)]
            self.client = self.lab.add_pod("load")
            for pod in self.pods():
                for key, value in topology.POD_SYSCTLS.items():
                    pod.run("sysctl", "-q", "-w", f"{key}={value}")
                self._start_sidecar(pod, self.servers[0].ipv4, maxconn=MAXCONN, idle=IDLE)
            for server in self.servers:
                self._write_and_spawn(server, "app", topology.APP.format(
                    app_port=topology.APP_PORT, maxconn=MAXCONN, idle=IDLE,
                    app_port_last=topology.APP_PORT + topology.APP_PORTS - 1))
                labmod.wait_listening(server, topology.APP_PORT)
        except BaseException:
            self.close()
            raise

    @property
    def sidecar_pids(self):
        return [self.pids["sidecar-load"], self.pids["sidecar-s0"]]

    def pods(self):
        return [*self.servers, *self.holders, self.client]


def _hold(pods, count):
    """Start the holders; returns (processes, {"held", "failed", "seconds"})."""
    procs, share = [], -(-count // len(pods.holders))
    for i, (holder, server) in enumerate(zip(pods.holders, pods.servers)):
        n = min(share, count - i * share)
        procs.append(holder.spawn(sys.executable, "-m", "interceptor.harness.bench.holder", str(server.ipv4),
                                  str(topology.APP_PORT + 1), str(topology.APP_PORTS - 1), str(n),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    out = {"held": 0, "failed": 0, "seconds": 0.0}
    for proc in procs:
        line = proc.stdout.readline()
        doc = json.loads(line) if line.strip() else {"held": 0, "failed": -1, "seconds": 0}
        out["held"] += doc["held"]
        out["failed"] += doc["failed"]
        out["seconds"] = max(out["seconds"], doc["seconds"])
    return procs, out


def _release(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            labmod.stop_process(proc)


def sample(mode, count, progress):
    loader.unload()
    ensure.load(**_LOAD[mode])
    pods = _Pods(count)
    procs = []
    try:
        for pod in pods.pods():
            enrollment.enroll(pod.netns_path, PodSettings(), pod=f"conns/{pod.name}")
        slab0, tcp0 = _kernel_memory()
        procs, held = _hold(pods, count)
        time.sleep(1)
        slab1, tcp1 = _kernel_memory()
        url = f"http://{pods.servers[0].ipv4}:{topology.APP_PORT}/"
        with pods.cpu_meter() as cpu:
            w = tools.wrk(pods.client, url, 8, SECONDS, close=True)
        w.update(cpu.per(w["requests"] / 1000))
        row = dict(w, mode=mode, connections=count, **held,
                   slab_per_conn=(slab1 - slab0) / max(1, held["held"]),
                   tcp_mem_per_conn=(tcp1 - tcp0) / max(1, held["held"]))
        progress(f"conns: {mode:<14} {count:>7} live ({held['held']} held, {held['failed']} failed, "
                 f"opened in {held['seconds']:.0f} s): {w['rps']:>6.0f} new conn/s, slab "
                 f"{row['slab_per_conn'] / 1024:.1f} KiB/conn")
        return row
    finally:
        _release(procs)
        for pod in pods.pods():
            enrollment.unenroll(netns_path=pod.netns_path)
        pods.close()


def run(rounds, progress, counts=COUNTS, modes=MODES):
    rows = []
    runs = [(count, mode) for count in counts for mode in modes]
    try:
        for r in range(rounds):
            k = r * len(modes) % len(runs)           # each round starts with the next count
            for count, mode in runs[k:] + runs[:k]:
                rows.append(dict(sample(mode, count, progress), round=r))
    finally:
        loader.unload()
    return {"rows": rows, "counts": list(counts), "modes": list(modes)}


def render(results):
    rows, counts, modes = results["rows"], results["counts"], results["modes"]

    def at(mode, count, key):
        return [r[key] for r in rows if r["mode"] == mode and r["connections"] == count]

    def per_round(mode, count, base_mode, base_count):
        base = {r["round"]: r["rps"] for r in rows if r["mode"] == base_mode and r["connections"] == base_count}
        return [r["rps"] / base[r["round"]] for r in rows
                if r["mode"] == mode and r["connections"] == count and base.get(r["round"])]

    lines = ["== new connections/s (wrk c=8, Connection: close) with N live intercepted "
             "connections held through both sidecars; medians, ratios per round",
             f"{'N':>8}" + "".join(f"{m + ' conn/s':>22}{'vs N=' + str(counts[0]):>20}" for m in modes)
             + f"{modes[-1] + '/' + modes[0]:>28}"]
    for count in counts:
        cells = "".join(f"{report._fmt(statistics.median(at(m, count, 'rps'))):>22}"
                        f"{report._ratio_cell(per_round(m, count, m, counts[0])):>20}" for m in modes)
        lines.append(f"{count:>8}{cells}{report._ratio_cell(per_round(modes[-1], count, modes[0], count)):>28}")
    lines.append("kernel memory per live connection (slab + TCP buffers, whole machine), and "
                 "failures (connections not held; wrk errors)")
    for count in counts:
        cells = []
        for m in modes:
            slab = statistics.median(at(m, count, "slab_per_conn")) / 1024
            tcp = statistics.median(at(m, count, "tcp_mem_per_conn")) / 1024
            failed = sum(at(m, count, "failed")) + sum(at(m, count, "socket_errors")) + \
                sum(at(m, count, "bad_responses"))
            cells.append(f"{m}: {slab:.1f} + {tcp:.1f} KiB, {failed} failed")
        lines.append(f"{count:>8}  " + ";  ".join(cells))
    return "\n".join(lines)


def plot(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (rate, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in results["modes"]:
        rows = [r for r in results["rows"] if r["mode"] == mode]
        counts = results["counts"]
        rate.plot(counts, [statistics.median([r["rps"] for r in rows if r["connections"] == c])
                           for c in counts], marker="o", label=mode)
        memory.plot(counts, [statistics.median([(r["slab_per_conn"] + r["tcp_mem_per_conn"]) / 1024
                                                for r in rows if r["connections"] == c])
                             for c in counts], marker="o", label=mode)
    rate.set(xscale="log", xlabel="live intercepted connections", ylabel="new connections/s",
             title="connection setup vs live connections")
    memory.set(xscale="log", xlabel="live intercepted connections", ylabel="KiB per connection",
               title="kernel memory per live connection")
    for ax in (rate, memory):
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "conns.png"), dpi=110)
    plt.close(fig)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join("bench-results", "conns")
    counts = tuple(int(c) for c in sys.argv[3].split(",")) if len(sys.argv) > 3 else COUNTS
    results = run(rounds, lambda line: print(line, flush=True), counts)
    report.save(out_dir, results, render(results))
    plot(results, out_dir)


if __name__ == "__main__":
    main()
