"""What the ingress filter costs per packet it lets in, measured in the kernel alone.

    python -m interceptor.harness.bench.filter_cost [ROUNDS] [OUT_DIR]

`bench xdp` measures the filter's cost as throughput through a veth, where this shared
two-core machine's noise (several percent between identical runs) hides a budget of 3%.
Here the kernel runs the pod's own program (the per-pod stub and the filter it
tail-calls, on the tc hook and on XDP) on one packet a million times
(BPF_PROG_TEST_RUN) and reports nanoseconds per run; a program that only returns "pass"
gives the harness's own cost, which is subtracted. The packet is what a pod receives most:
a TCP segment of an established flow to a port the pod serves, with the default settings
and with an ingress policy of ten rules. Rounds alternate the programs so drift cancels.
What that costs a flow depends on packets per second, so the report also gives the cost
as a share of one core at 10 Gbit/s of full-size segments (GRO/TSO off: every segment
is a packet) and of 64 KiB aggregates (GRO/TSO on, the default between local veths).
"""
import os
import statistics
import struct
import sys

if __name__ == "__main__":
    # its own pins and state, as `interceptor bench` (set before interceptor.paths reads them)
    os.environ.setdefault("INTERCEPTOR_PIN_ROOT", "/sys/fs/bpf/interceptor-bench")
    os.environ.setdefault("INTERCEPTOR_RUN_DIR", "/run/interceptor-bench")

from interceptor.kernel import libbpf
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import pod_entries, stubs
from interceptor.datapath.maps import Maps
from interceptor.ops import ensure, loader
from interceptor.harness.bench import report

REPEAT = 1_000_000
COOKIE = 0x7E57C0DE00000002      # a pod that exists only in the maps
POD_ADDR, PEER_ADDR, POD_PORT, PEER_PORT = "10.71.0.2", "10.71.0.3", 8080, 40000
PAYLOAD = 1448                    # a full-size segment at MTU 1500 with timestamps
POLICY = [f"deny from 192.0.2.{i}/32 tcp port {9000 + i}" for i in range(9)] + ["allow tcp port 8080"]
# hook -> (the pod's stub, program type, what a bare pass returns, what the filter's pass
# returns: TC_ACT_OK / TC_ACT_UNSPEC, so later tc filters still run; XDP_PASS)
HOOKS = {"tc": (stubs.TC, libbpf.ProgType.SCHED_CLS, 0, 0xFFFFFFFF),
         "xdp": (stubs.XDP, libbpf.ProgType.XDP, 2, 2)}
LINE_RATE_BPS = 10e9


def _segment():
    """Ethernet + IPv4 + TCP (ACK|PSH, established) + payload, checksums left zero (the
    filter does not check them)."""
    def ip(addr):
        return bytes(int(x) for x in addr.split("."))
    tcp = struct.pack("!HHIIBBHHH", PEER_PORT, POD_PORT, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + PAYLOAD
    ipv4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, ip(PEER_ADDR), ip(POD_ADDR))
    eth = bytes.fromhex("020000000002" "020000000001" "0800")
    return eth + ipv4 + tcp + b"x" * PAYLOAD


def _programs(fds):
    """Fill fds ({name: fd}, the caller closes them, also after a failure half-way): the
    pod's stub on each hook with each policy, and a bare "pass" per hook."""
    for hook, (kind, prog_type, passed, _) in HOOKS.items():
        fds[f"{hook} pass only"] = libbpf.load_trivial_prog(prog_type, 0, passed)
        for label, policy in (("default", ()), ("10 rules", POLICY)):
            cookie = COOKIE + (1 if policy else 0)
            with Maps() as maps:
                pod_entries.write_filter(maps, cookie, PodSettings(ingress_policy=list(policy)), 32768)
            fds[f"{hook} filter, {label}"] = stubs.load_for_pod(kind, cookie)


def run(rounds, progress=print):
    loader.unload()
    ensure.load(mode="ebpf")
    frame = _segment()
    samples = {}
    fds = {}
    try:
        _programs(fds)
        names = list(fds)
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                verdict, ns = libbpf.prog_test_run(fds[name], frame, repeat=REPEAT)
                hook = HOOKS[name.split()[0]]
                if verdict != (hook[2] if name.endswith("pass only") else hook[3]):
                    raise RuntimeError(f"{name}: verdict {verdict:#x}, not pass: measured the wrong path")
                samples.setdefault(name, []).append(ns)
            progress(f"filter cost round {r + 1}/{rounds}: " +
                     ", ".join(f"{n}: {samples[n][-1]} ns" for n in names))
    finally:
        for fd in fds.values():
            os.close(fd)
        loader.unload()
    return {"repeat": REPEAT, "packet_bytes": len(frame), "samples": samples}


def render(results):
    samples = results["samples"]
    lines = [f"== the ingress filter per packet (BPF_PROG_TEST_RUN, {results['repeat']:,} runs per "
             f"sample, a {results['packet_bytes']}-byte TCP segment of an established flow); ns "
             "per packet above the hook's bare pass, median (min-max) over rounds",
             f"{'program':<24}{'ns/run':>8}{'filter ns':>16}{'core at 10G, 1500 B':>22}"
             f"{'core at 10G, 64 KiB':>22}"]
    mtu_pps = LINE_RATE_BPS / 8 / 1500
    gro_pps = LINE_RATE_BPS / 8 / 65536
    for name, values in samples.items():
        hook = name.split()[0]
        base = samples[f"{hook} pass only"]
        extra = [v - b for v, b in zip(values, base)]
        median = statistics.median(extra)
        row = f"{name:<24}{statistics.median(values):>8.0f}"
        if name.endswith("pass only"):
            lines.append(row)
            continue
        row += f"{median:>8.0f} ({min(extra)}-{max(extra)})".rjust(16)
        row += f"{median * mtu_pps / 1e9:>21.2%} {median * gro_pps / 1e9:>21.3%}"
        lines.append(row)
    return "\n".join(lines)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join("bench-results", "filter-cost")
    results = run(rounds)
    report.save(out_dir, results, render(results))


if __name__ == "__main__":
    main()
