"""`bench xdp`: what the ingress filter costs, on each hook and each path into a pod.

Part one, packets per second dropped at a pod's veth, on one core.

trafgen (netsniff-ng) sends 64-byte UDP frames to the pod's protected port 15001 from the
node side of the pod's veth, pinned to CPU 1; RPS puts the pod's receive processing on
CPU 0 (native XDP on veth runs in a NAPI poll on the sending CPU instead: RPS acts after
it). One sending core cannot saturate one receiving core here, so besides the rate the
run reports the machine's CPU time per dropped packet (both cores, sender included: the
sender's share is the same in every mode, the difference is the drop path's).
Modes, interleaved round by round in one run:
  tc            the pod's filter on the tc hook (interceptor's default on veth)
  xdp-native    the same verdict as an XDP program in driver mode
  xdp-generic   the same XDP program in generic (skb) mode
  nftables      the fallback: the netdev ingress chain interceptor writes without BPF
  iptables-raw  `iptables -t raw -A PREROUTING -p udp --dport 15001 -j DROP` in the pod
The rate is what the mode's own counter says it dropped, divided by the time; the
frames the sender got out are reported beside it.

Part two, what the filter costs the traffic it lets in, against `none`, on each path a
pod receives on: bulk TCP (iperf3) from the node into the pod with RPS steering the
receive work to one core and without (GRO, as the stack has it), bulk TCP from another
pod on the same bridge, and keep-alive HTTP requests from that pod (wrk, 8 connections,
to HAProxy answering in the pod). One lab, the filter put on and taken off between
short samples, modes in a rotating order: each ratio is against `none` of the same
round, measured seconds before, so the machine's drift (it is shared) cancels out. A
path across nodes is not measured here.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time

from interceptor import abi
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.datapath.maps import Maps
from interceptor.pieces import ingress_nft
from interceptor.ops import counters, enrollment, ensure, loader
from interceptor.harness import lab as labmod
from interceptor.harness.bench.tools import machine_ticks
from interceptor.harness.bench.topology import APP, IDLE, MAXCONN  # HAProxy answering HTTP

TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")

MODES = ("tc", "xdp-native", "xdp-generic", "nftables", "iptables-raw")
STREAM_MODES = ("none",) + MODES
PORT = abi.OUTBOUND_PORT
APP_PORT = 8080               # HAProxy answering HTTP in the pod (part two)
IPERF_PORT = 5201
# part two's measurements: key -> column title
PATHS = {"stream_gbit_s": "node->pod RPS Gbit/s", "stream_norps_gbit_s": "node->pod Gbit/s",
         "pod_stream_gbit_s": "pod->pod Gbit/s", "pod_rr_rps": "pod->pod keep-alive req/s"}
SENDER_CPU = 1
DROP_CPU = 0


def available():
    return shutil.which("trafgen") is not None


def _frame(lab, pod):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    mac = json.loads(pod.run("ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
    frame = (Ether(dst=mac, src="02:00:00:00:00:01") / IP(src=str(lab.gateway4), dst=str(pod.ipv4))
             / UDP(sport=40000, dport=PORT) / Raw(b"\0" * 18))
    return bytes(frame)


def _trafgen_conf(frame, path):
    with open(path, "w") as f:
        f.write("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")


def _tx_packets(lab, host_if):
    out = subprocess.run(["ip", "netns", "exec", lab.node_ns, "ip", "-s", "-j", "link", "show", host_if],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["packets"]


def _iptables_dropped(pod):
    out = pod.run("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n").stdout
    for line in out.splitlines():
        if f"dpt:{PORT}" in line:
            return int(line.split()[0])
    return 0


def _setup(mode, pod):
    """Install the mode's drop; returns a function reading its dropped-packet count."""
    if mode == "none":
        return lambda: 0
    if _enrolled(mode):
        # iperf3's and the app's ports are not steered: there is no sidecar, only the
        # filter is measured
        rec = enrollment.enroll(pod.netns_path, PodSettings(
            ingress_filter=mode.removeprefix("xdp-"), exclude_inbound_ports=[IPERF_PORT, APP_PORT]),
            pod="bench/sink")
        cookie = rec.cookie

        def xdp_dropped():
            with Maps() as maps:
                mine = counters.from_maps(maps).get(cookie, {})
            return mine.get("ingress_dropped_protected_port", {}).get("count", 0)
        return xdp_dropped
    if mode == "nftables":
        ingress_nft.apply(pod.netns_path, ["eth0"], [abi.ADMIN_PORT, PORT], [], 32768)
        return lambda: ingress_nft.counters(pod.netns_path).get(
            "ingress_dropped_protected_port", {}).get("count", 0)
    pod.run("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", str(PORT), "-j", "DROP")
    return lambda: _iptables_dropped(pod)


def _enrolled(mode):
    return mode == "tc" or mode.startswith("xdp-")


def _settled(read, timeout=2.0):
    """The counter once the last queued frames have been judged (it stops moving)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now == last:
            return now
        last = now
    return last


def _stream_gbit(lab, pod, seconds, client=None):
    """iperf3 into pod from the node's namespace, or from the client pod."""
    server = pod.spawn("iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labmod.wait_listening(pod, IPERF_PORT)
    where = ["ip", "netns", "exec", client.netns if client else lab.node_ns]
    p = subprocess.run(where + ["iperf3", "-c", str(pod.ipv4), "-t", str(seconds), "-J"],
                       capture_output=True, text=True)
    labmod.stop_process(server)
    try:
        return json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        return None


def _set_rps(pod, cpus_mask):
    pod.run("sh", "-c", f"echo {cpus_mask:x} > /sys/class/net/eth0/queues/rx-0/rps_cpus")


def one(mode, seconds, net):
    """Part one for one mode, in a lab of its own."""
    with labmod.Lab(prefix=f"icb{os.getpid() % 10000}", net=net) as lab:
        pod = lab.add_pod("sink")
        host_if = f"{lab.prefix}sink"[:15]
        dropped = _setup(mode, pod)
        # receive processing on DROP_CPU (RPS), the sender on another core
        _set_rps(pod, 1 << DROP_CPU)
        workdir = tempfile.mkdtemp(prefix="icb-trafgen-")
        try:
            if mode == "none":
                return {}
            conf = os.path.join(workdir, "udp.cfg")
            _trafgen_conf(_frame(lab, pod), conf)
            sent0, dropped0 = _tx_packets(lab, host_if), dropped()
            ticks0 = machine_ticks()["busy"]
            started = time.monotonic()
            subprocess.run(["ip", "netns", "exec", lab.node_ns, "timeout", "-s", "INT", str(seconds),
                            "taskset", "-c", str(SENDER_CPU), "trafgen", "--dev", host_if, "--conf", conf,
                            "--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"],
                           capture_output=True, text=True)
            elapsed = time.monotonic() - started
            busy_ns = (machine_ticks()["busy"] - ticks0) * TICK_NS
            sent, drops = _tx_packets(lab, host_if) - sent0, _settled(dropped) - dropped0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if _enrolled(mode):
                enrollment.unenroll(netns_path=pod.netns_path)
        return {"pps_dropped": drops / elapsed, "pps_sent": sent / elapsed,
                "cpu_ns_per_packet": busy_ns / drops if drops else None,
                "dropped": drops, "sent": sent, "seconds": round(elapsed, 3)}


def _teardown(mode, pod):
    if _enrolled(mode):
        enrollment.unenroll(netns_path=pod.netns_path)
    elif mode == "nftables":
        ingress_nft.remove(pod.netns_path)
    elif mode == "iptables-raw":
        pod.run("iptables", "-t", "raw", "-D", "PREROUTING", "-p", "udp", "--dport", str(PORT), "-j", "DROP")


def _measure_paths(lab, pod, client, seconds):
    from interceptor.harness.bench.tools import wrk
    out = {}
    _set_rps(pod, 1 << DROP_CPU)
    out["stream_gbit_s"] = _stream_gbit(lab, pod, seconds)
    _set_rps(pod, 0)
    out["stream_norps_gbit_s"] = _stream_gbit(lab, pod, seconds)
    out["pod_stream_gbit_s"] = _stream_gbit(lab, pod, seconds, client=client)
    result = wrk(client, f"http://{pod.ipv4}:{APP_PORT}/", 8, max(1, round(seconds)))
    out["pod_rr_rps"] = result["rps"] if not (result["socket_errors"] or result["bad_responses"]) else None
    return out


def filter_cost(runs, seconds, progress, modes):
    """Part two: {mode: [sample]}, every mode measured in each round, in one lab."""
    samples = {}
    with labmod.Lab(prefix=f"icb{os.getpid() % 10000}", net=75) as lab:
        pod, client = lab.add_pod("sink"), lab.add_pod("src")
        path = os.path.join(lab.workdir, "app.cfg")
        with open(path, "w") as f:
            f.write(APP.format(app_port=APP_PORT, app_port_last=APP_PORT, maxconn=MAXCONN, idle=IDLE))
        app = pod.spawn("haproxy", "-db", "-f", path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            labmod.wait_listening(pod, APP_PORT)
            for r in range(runs):
                for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                    _setup(mode, pod)
                    try:
                        s = _measure_paths(lab, pod, client, seconds)
                    finally:
                        _teardown(mode, pod)
                    samples.setdefault(mode, []).append(dict(s, round=r))
                    progress(f"xdp paths round {r + 1}/{runs} {mode:<13} " + ", ".join(
                        f"{PATHS[k]} {v:.2f}" for k, v in s.items() if v is not None))
        finally:
            labmod.stop_process(app)
    return samples


def run(runs, seconds, progress, paths_runs=None, modes=STREAM_MODES):
    """{"drops": {mode: [sample]}, "paths": {mode: [sample]}} over interleaved rounds;
    loads the datapath for the BPF modes. paths_runs: part two's rounds (default: twice
    part one's, its samples being short and many)."""
    if not available():
        progress("xdp: trafgen (Debian package netsniff-ng) is not installed; skipped")
        return {}
    loader.unload()
    ensure.load()
    modes = list(modes)
    hooks = node_state.node_plan().bpf_filter_hooks
    if not hooks:
        progress("xdp: this node has no BPF ingress filter; only the rule-based modes are measured")
        modes = [m for m in modes if not _enrolled(m)]
    elif "xdp" not in hooks or "tc" not in hooks:
        # a pod asking for a hook the kernel refused gets the other: measure only what runs
        progress(f"xdp: this kernel refused the {'xdp' if 'xdp' not in hooks else 'tc'} filter; its modes are skipped")
        modes = [m for m in modes if not _enrolled(m) or m.split("-")[0] in hooks]
    drops, paths = {}, {}
    try:
        for r in range(runs):
            dropping = [m for m in modes if m != "none"]
            for mode in dropping[r % len(dropping):] + dropping[:r % len(dropping)]:
                s = one(mode, seconds, net=76)
                drops.setdefault(mode, []).append(dict(s, round=r))
                progress(f"xdp round {r + 1}/{runs} {mode:<13} {s['pps_dropped'] / 1e6:6.2f} Mpps dropped "
                         f"({s['pps_sent'] / 1e6:.2f} Mpps sent, {s['cpu_ns_per_packet'] or 0:.0f} CPU ns/pkt)")
        paths = filter_cost(paths_runs or 2 * runs, seconds, progress, modes)
    finally:
        loader.unload()
    return {"drops": drops, "paths": paths}


def _ratio(samples, mode, base, key):
    from interceptor.harness.bench.report import _median
    by_round = {s["round"]: s.get(key) for s in samples.get(base, [])}
    ratios = [s[key] / by_round[s["round"]] for s in samples[mode]
              if s.get(key) and by_round.get(s["round"])]
    return f"{_median(ratios):.2f}" if ratios else "-"


def render(results):
    from interceptor.harness.bench.report import _median, _range
    if "drops" not in results:          # results of before part two: one table of both
        results = {"drops": results, "paths": results}
    drops, paths = results["drops"], results["paths"]
    lines = ["== xdp: UDP frames to a protected port dropped at the pod's veth (trafgen on CPU 1, "
             "receive on CPU 0; CPU ns/pkt: both cores, sender included)",
             f"{'mode':<14}{'Mpps dropped':>14}{'min-max':>16}{'Mpps sent':>11}{'CPU ns/pkt':>12}"
             f"{'CPU vs ipt-raw':>16}"]
    for mode, runs in drops.items():
        if "pps_dropped" not in runs[0]:
            continue
        values = [s["pps_dropped"] for s in runs]
        lo, hi = _range(values)
        lines.append(f"{mode:<14}{_median(values) / 1e6:>14.2f}{f'{lo / 1e6:.2f} - {hi / 1e6:.2f}':>16}"
                     f"{_median([s['pps_sent'] for s in runs]) / 1e6:>11.2f}"
                     f"{_median([s['cpu_ns_per_packet'] for s in runs]):>12.0f}"
                     f"{_ratio(drops, mode, 'iptables-raw', 'cpu_ns_per_packet'):>16}")
    measured = [key for key in PATHS if any(s.get(key) for runs in paths.values() for s in runs)]
    lines += ["", "== xdp: what each filter costs the traffic it lets in: value, and the median of "
              "per-round ratios vs none (min-max)",
              f"{'mode':<14}" + "".join(f"{PATHS[key]:>32}" for key in measured)]
    for mode, runs in paths.items():
        row = f"{mode:<14}"
        for key in measured:
            values = [s[key] for s in runs if s.get(key)]
            cell = f"{_median(values):.2f} {_ratio_range(paths, mode, 'none', key)}" if values else "-"
            row += f"{cell:>32}"
        lines.append(row)
    return "\n".join(lines)


def _ratio_range(samples, mode, base, key):
    from interceptor.harness.bench.report import _median
    by_round = {s["round"]: s.get(key) for s in samples.get(base, [])}
    ratios = [s[key] / by_round[s["round"]] for s in samples[mode]
              if s.get(key) and by_round.get(s["round"])]
    if not ratios:
        return "(-)"
    return f"({_median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    # a focused run: python -m interceptor.harness.bench.xdp DROP_ROUNDS PATH_ROUNDS SECONDS MODE,MODE,...
    import sys
    drop_rounds, path_rounds, secs = map(int, sys.argv[1:4])
    chosen = sys.argv[4].split(",") if len(sys.argv) > 4 else list(STREAM_MODES)
    print(render(run(drop_rounds, secs, lambda m: print(m, flush=True), paths_runs=path_rounds,
                     modes=chosen)))
