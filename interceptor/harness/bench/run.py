"""The benchmark run: scenarios over modes, interleaved round by round (A B C A B C ...,
each round starting one mode later) so that drift on a shared machine hits every mode
alike; everything it creates is removed at the end, also when interrupted."""
import json
import os
import platform
import signal
import subprocess
import sys
import time

from interceptor.datapath import node_state
from interceptor.ops import loader
from interceptor.harness.bench import cni as cni_bench, modes, report, tools, xdp as xdp_bench
from interceptor.harness.bench.topology import POD_SYSCTLS, Topology

SCENARIOS = ("rr", "crr", "stream", "xnode", "rules", "cni", "xdp")
RULE_SIZES = (10, 100, 1000, 10000)
RULE_SIZES_QUICK = (10, 1000)
# rule evaluation only: the bypass (a per-connection cost of its own) stays off
RULE_MODES = ("iptables", "nftables", "ebpf-nobypass")


_MAIN_PID = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:
        # a forked helper (pyroute2's netns worker) inherited the handler: end as SIGTERM would
        os._exit(128 + signum)
    raise KeyboardInterrupt


def _progress(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def environment():
    def version(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "haproxy": version(["haproxy", "-v"]),
            "envoy": _envoy_version(),
            "wrk": version(["wrk", "-v"]), "iperf3": version(["iperf3", "--version"]),
            "pod_sysctls": POD_SYSCTLS, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _envoy_version():
    from interceptor.harness import envoy_sidecar
    try:
        out = subprocess.run([envoy_sidecar.binary(), "--version"], capture_output=True, text=True).stdout
    except (envoy_sidecar.EnvoyMissing, OSError):
        return None
    return out.strip().split("version: ")[-1] or None


def excluded_lists(n):
    """n CIDRs and n ports the traffic never matches, so every one of them is evaluated."""
    cidrs = [f"100.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}/32" for i in range(n)]
    ports = [20000 + i for i in range(min(n, 40000))]
    return {"exclude_outbound_cidrs": cidrs, "exclude_outbound_ports": ports}


# Every option of Istio's that adds matching at connect, set so that none of them leaves
# the bench's connections alone (they are root's, to a port other than DNS's, through
# eth0): several proxy uids and gids, owner users and groups to include and exclude, an
# excluded interface (its routes looked up), a port range, DNS capture, a skip mark.
ISTIO_OPTIONS = {"proxy_uid": "1337,3,4", "proxy_gid": "1337,1,2", "owner_users_include": "0,101",
                 "owner_users_exclude": "999", "owner_groups_include": "0,202",
                 "owner_groups_exclude": "888", "exclude_interfaces": "eth9",
                 "redirect_dns": True, "skip_mark": "0x539/0xfff"}


def with_istio_options(n):
    """excluded_lists(n) with a port range in place of the ports, and ISTIO_OPTIONS."""
    lists = excluded_lists(n)
    lists["exclude_outbound_ports"] = f"20000-{20000 + max(n, 2) - 1}"
    return dict(lists, **ISTIO_OPTIONS)


def run(scenarios=SCENARIOS, quick=False, runs=None, seconds=None, out_dir=None, modes_=modes.MODES,
        peer=None, proxy="haproxy"):
    """peer: (host, port) of `interceptor bench --serve` on another machine; the x-node
    scenario then runs with the server pod there (scenarios other than xnode are refused
    by the CLI). proxy: the pods' sidecar in the per-mode scenarios (rr, crr, stream,
    xnode): "haproxy" or "envoy" (as Istio configures it)."""
    runs = runs or (1 if quick else 3)
    seconds = seconds or (1 if quick else 5)
    out_dir = out_dir or os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    results = {"env": environment(), "settings": {"runs": runs, "seconds": seconds, "quick": quick,
                                                  "proxy": proxy,
                                                  "modes": list(modes_), "scenarios": list(scenarios)},
               "samples": {}, "rules": {}, "rules_options": {}, "cni": None, "xdp": {}}
    old_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if node_state.is_loaded():
            loader.unload()
        per_mode = [s for s in scenarios if s in ("rr", "crr", "stream")]
        if per_mode:
            _rounds(lambda: Topology(proxy=proxy), per_mode, modes_, runs, seconds, results, prefix="")
        if "xnode" in scenarios and peer:
            _across_machines(peer, modes_, runs, seconds, results)
        elif "xnode" in scenarios:
            _rounds(lambda: Topology(cross_node=True, proxy=proxy), ("rr", "crr", "stream"), modes_, runs, seconds,
                    results, prefix="x-node ")
            modes.unload_node2()
        if "rules" in scenarios:
            sizes = RULE_SIZES_QUICK if quick else RULE_SIZES
            runs_of_round = [(slot, size, mode) for slot, size in enumerate(sizes) for mode in RULE_MODES]
            for r in range(runs):
                # each round starts with the next size, so no size is always measured last
                k = r * len(RULE_MODES) % len(runs_of_round)
                for slot, size, mode in runs_of_round[k:] + runs_of_round[:k]:
                    with _fresh(Topology()) as topo:
                        modes.apply(mode, topo, client_settings=excluded_lists(size))
                        url = modes.http_target(mode, topo, slot=slot)
                        with topo.cpu_meter() as cpu:
                            w = tools.wrk(topo.client, url, 8, seconds, close=True)
                    w.update(cpu.per(w["requests"] / 1000), round=r)
                    results["rules"].setdefault(mode, {}).setdefault(str(size), []).append(w)
                    _progress(f"rules round {r + 1}/{runs} {mode:<14} {size:>6} excluded: "
                              f"{w['rps']:.0f} conn/s")
            # Istio's options (owner filters, several proxy ids, interfaces, a port range,
            # DNS, a skip mark) against the same smallest lists without them, interleaved
            pairs = [(shape, mode) for mode in RULE_MODES for shape in ("plain", "istio")]
            for r in range(runs):
                k = r % len(pairs)
                for shape, mode in pairs[k:] + pairs[:k]:
                    lists = with_istio_options(sizes[0]) if shape == "istio" else excluded_lists(sizes[0])
                    with _fresh(Topology()) as topo:
                        modes.apply(mode, topo, client_settings=lists)
                        url = modes.http_target(mode, topo, slot=0)
                        w = tools.wrk(topo.client, url, 8, seconds, close=True)
                    w["round"] = r
                    results["rules_options"].setdefault(mode, {}).setdefault(shape, []).append(w)
                    _progress(f"rules round {r + 1}/{runs} {mode:<14} {shape:>6} options: "
                              f"{w['rps']:.0f} conn/s")
        loader.unload()
        if "xdp" in scenarios:
            results["xdp"] = xdp_bench.run(runs, seconds, _progress, paths_runs=1 if quick else None)
        if "cni" in scenarios:
            _progress("cni: plugin latency")
            results["cni"] = cni_bench.run(sequential=30 if quick else 100, concurrent=40,
                                           versions=20 if quick else 50, rounds=runs,
                                           echo=lambda _: None)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        loader.unload()
        if "xnode" in scenarios and not peer:
            modes.unload_node2()
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    text = report.render(results)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    report.plots(results, out_dir)
    print(text)
    print(f"\nresults, summary and plots in {out_dir}/")
    return results


class _fresh:
    """Every run gets pods of its own: TIME_WAIT sockets and conntrack entries an earlier
    run left (REDIRECT maps many destinations onto one proxy port, so a new connection's
    reply tuple can clash with an old entry and its SYN is dropped: a 1 s stall) must not
    be charged to the mode that happens to run next."""

    def __init__(self, topo):
        self.topo = topo

    def __enter__(self):
        return self.topo

    def __exit__(self, *exc):
        try:
            modes.release(self.topo)
        finally:
            self.topo.close()


def _across_machines(peer, modes_, runs, seconds, results):
    from interceptor.harness.bench import peer as peer_mod
    control, peer_ip = peer_mod.connect(peer)
    try:
        results["peer_env"] = control.call("hello")["env"]
        _progress(f"x-machine: server pods on {peer[0]}:{peer[1]} ({results['peer_env']['kernel']})")
        _rounds(lambda: peer_mod.ClientTopology(control, peer_ip), ("rr", "crr", "stream"), modes_,
                runs, seconds, results, prefix="x-machine ")
    finally:
        try:
            control.call("bye")
        except (OSError, peer_mod.PeerError):
            pass
        control.close()


def _rounds(make_topology, scenarios, modes_, runs, seconds, results, prefix):
    for r in range(runs):
        order = list(modes_[r % len(modes_):]) + list(modes_[:r % len(modes_)])
        for mode in order:
            with _fresh(make_topology()) as topo:
                modes.apply(mode, topo)
                for sample in _per_mode(topo, mode, scenarios, seconds, prefix):
                    results["samples"].setdefault(sample.pop("scenario"), {}) \
                        .setdefault(mode, []).append(dict(sample, round=r))


def _per_mode(topo, mode, scenarios, seconds, prefix=""):
    http = modes.http_target(mode, topo)
    if "rr" in scenarios:
        for conns in (1, 16):
            with topo.cpu_meter() as cpu:
                w = tools.wrk(topo.client, http, conns, seconds)
            w.update(cpu.per(w["requests"] / 1000))
            _progress(f"{prefix}{mode:<14} rr c={conns:<3} {w['rps']:>9.0f} req/s  p99 {w['p99_ms']:.2f} ms")
            yield dict(w, scenario=f"{prefix}rr c={conns}")
    if "crr" in scenarios:
        with topo.cpu_meter() as cpu:
            w = tools.wrk(topo.client, http, 8, seconds, close=True)
        w.update(cpu.per(w["requests"] / 1000))
        _progress(f"{prefix}{mode:<14} crr c=8   {w['rps']:>9.0f} conn/s p99 {w['p99_ms']:.2f} ms")
        yield dict(w, scenario=f"{prefix}crr c=8")
    if "stream" in scenarios:
        host, port = modes.iperf_target(mode, topo)
        with topo.cpu_meter() as cpu:
            s = tools.iperf3(topo.client, host, port, seconds)
        s.update(cpu.per(s["bytes"] / 1e9))       # CPU ms per GB
        _progress(f"{prefix}{mode:<14} stream    " + (f"{s['gbit_s']:>9.2f} Gbit/s" if s["gbit_s"]
                                                       else f"failed: {s['error']}"))
        yield dict(s, scenario=f"{prefix}stream")
