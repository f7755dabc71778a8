"""`bench xdp`: packets per second dropped at a pod's veth, on one core.

trafgen (netsniff-ng) sends 64-byte UDP frames to the pod's protected port 15001 from the
node side of the pod's veth, pinned to CPU 1; RPS puts the pod's receive processing on
CPU 0 (native XDP on veth runs in a NAPI poll on the sending CPU instead: RPS acts after
it). One sending core cannot saturate one receiving core here, so besides the rate the
run reports the machine's CPU time per dropped packet (both cores, sender included: the
sender's share is the same in every mode, the difference is the drop path's).
Modes, interleaved round by round in one run:
  xdp-native    the pod's XDP program in driver mode (interceptor's default on veth)
  xdp-generic   the same program in generic (skb) mode
  nftables      the fallback: the netdev ingress chain interceptor writes without XDP
  iptables-raw  `iptables -t raw -A PREROUTING -p udp --dport 15001 -j DROP` in the pod
The rate is what the mode's own counter says it dropped, divided by the time; the
frames the sender got out are reported beside it. Each mode also carries a bulk TCP
stream (iperf3, node -> pod) through its filter, against `none`: what the filter costs
the traffic it lets in.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time

from .. import abi, counters, enrollment, ingress_nft, lab as labmod, loader
from ..maps import Maps
from ..podspec import PodSettings
from .tools import machine_ticks

TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")

MODES = ("xdp-native", "xdp-generic", "nftables", "iptables-raw")
STREAM_MODES = ("none",) + MODES
PORT = abi.OUTBOUND_PORT
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
    if mode.startswith("xdp-"):
        # iperf3's port is not steered: there is no sidecar, only the filter is measured
        rec = enrollment.enroll(pod.netns_path, PodSettings(
            ingress_filter=mode[len("xdp-"):], exclude_inbound_ports=[5201]), pod="bench/sink")
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


def _stream_gbit(lab, pod, seconds):
    server = pod.spawn("iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labmod.wait_listening(pod, 5201)
    p = subprocess.run(["ip", "netns", "exec", lab.node_ns, "iperf3", "-c", str(pod.ipv4),
                        "-t", str(seconds), "-J"], capture_output=True, text=True)
    labmod.stop_process(server)
    try:
        return json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        return None


def one(mode, seconds, net):
    with labmod.Lab(prefix=f"icb{os.getpid() % 10000}", net=net) as lab:
        pod = lab.add_pod("sink")
        host_if = f"{lab.prefix}sink"[:15]
        dropped = _setup(mode, pod)
        # receive processing on DROP_CPU (RPS), the sender on another core
        pod.run("sh", "-c", f"echo {1 << DROP_CPU:x} > /sys/class/net/eth0/queues/rx-0/rps_cpus")
        workdir = tempfile.mkdtemp(prefix="icb-trafgen-")
        try:
            gbit = _stream_gbit(lab, pod, seconds)
            if mode == "none":
                return {"stream_gbit_s": gbit}
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
            if mode.startswith("xdp-"):
                enrollment.unenroll(netns_path=pod.netns_path)
        return {"pps_dropped": drops / elapsed, "pps_sent": sent / elapsed, "stream_gbit_s": gbit,
                "cpu_ns_per_packet": busy_ns / drops if drops else None,
                "dropped": drops, "sent": sent, "seconds": round(elapsed, 3)}


def run(runs, seconds, progress):
    """{mode: [sample]} over interleaved rounds; loads the datapath for the XDP modes."""
    if not available():
        progress("xdp: trafgen (Debian package netsniff-ng) is not installed; skipped")
        return {}
    loader.unload()
    loader.load()
    modes = list(STREAM_MODES)
    if loader.node_plan().get("ingress") != "xdp":
        progress("xdp: this node has no XDP; only the rule-based modes are measured")
        modes = [m for m in modes if not m.startswith("xdp-")]
    samples = {}
    try:
        for r in range(runs):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                s = one(mode, seconds, net=76)
                samples.setdefault(mode, []).append(dict(s, round=r))
                gbit = f"{s['stream_gbit_s']:.2f}" if s["stream_gbit_s"] else "failed"
                drop = (f"{s['pps_dropped'] / 1e6:6.2f} Mpps dropped ({s['pps_sent'] / 1e6:.2f} Mpps sent, "
                        f"{s['cpu_ns_per_packet'] or 0:.0f} CPU ns/pkt), " if "pps_dropped" in s else "")
                progress(f"xdp round {r + 1}/{runs} {mode:<13} {drop}stream in {gbit} Gbit/s")
    finally:
        loader.unload()
    return samples


def _ratio(samples, mode, base, key):
    from .report import _median
    by_round = {s["round"]: s.get(key) for s in samples.get(base, [])}
    ratios = [s[key] / by_round[s["round"]] for s in samples[mode]
              if s.get(key) and by_round.get(s["round"])]
    return f"{_median(ratios):.2f}" if ratios else "-"


def render(samples):
    from .report import _median, _range
    lines = ["== xdp: UDP frames to a protected port dropped at the pod's veth (trafgen on CPU 1, "
             "receive on CPU 0; CPU ns/pkt: both cores, sender included); bulk TCP into the pod "
             "through the same filter",
             f"{'mode':<14}{'Mpps dropped':>14}{'min-max':>16}{'Mpps sent':>11}{'CPU ns/pkt':>12}"
             f"{'CPU vs ipt-raw':>16}{'stream Gbit/s':>15}{'vs none':>9}"]
    for mode, runs in samples.items():
        row = f"{mode:<14}"
        if "pps_dropped" in runs[0]:
            values = [s["pps_dropped"] for s in runs]
            lo, hi = _range(values)
            row += (f"{_median(values) / 1e6:>14.2f}{f'{lo / 1e6:.2f} - {hi / 1e6:.2f}':>16}"
                    f"{_median([s['pps_sent'] for s in runs]) / 1e6:>11.2f}"
                    f"{_median([s['cpu_ns_per_packet'] for s in runs]):>12.0f}"
                    f"{_ratio(samples, mode, 'iptables-raw', 'cpu_ns_per_packet'):>16}")
        else:
            row += f"{'-':>14}{'-':>16}{'-':>11}{'-':>12}{'-':>16}"
        gbit = _median([s.get("stream_gbit_s") for s in runs])
        row += f"{gbit:>15.2f}" if gbit else f"{'-':>15}"
        row += f"{_ratio(samples, mode, 'none', 'stream_gbit_s'):>9}"
        lines.append(row)
    return "\n".join(lines)
