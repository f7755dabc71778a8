"""What the connect hook costs per exclusion-list size, without proxies or load generators.

    python -m interceptor.harness.bench.connect_cost [ROUNDS] [OUT_DIR] [SIZES]

`bench rules` measures connection rates through two HAProxy sidecars, where the machine's
noise (a shared two-core VM) is larger than the hook's cost. Here one pod connects to an
intercepted destination with no proxy listening: the hook runs every check (pod, CIDR and
port lists, the proxy's listener) and redirects, and the kernel refuses the connection at
once over loopback. Blocks of connects alternate between list sizes (and a pod not
enrolled, where the hook only looks the pod up), one block per size per round, so drift
cancels out; the difference between sizes is the lists' cost per connect.
"""
import os
import statistics
import sys

if __name__ == "__main__":
    # its own pins and state, as `interceptor bench` (set before interceptor.paths reads them)
    os.environ.setdefault("INTERCEPTOR_PIN_ROOT", "/sys/fs/bpf/interceptor-bench")
    os.environ.setdefault("INTERCEPTOR_RUN_DIR", "/run/interceptor-bench")

from interceptor import abi
from interceptor.pod.podspec import PodSettings
from interceptor.ops import enrollment, ensure, loader
from interceptor.harness import lab as labmod
from interceptor.harness.bench import report
from interceptor.harness.bench.run import excluded_lists, with_istio_options

SIZES = (10, 100, 1000, 10_000)
CONNECTS = 20_000             # per block
DESTINATION = ("10.200.0.1", 9)   # intercepted (no list matches it)
NOT_ENROLLED = 0              # the size label of the pod without enrollment, which connects
                              # where the hook would have sent it: the same refusal, no hook work
WITH_OPTIONS = -1             # the label of the smallest lists with every Istio option

# Runs inside the pod: CONNECTS refused connects, nanoseconds per connect (socket to close).
_CONNECTS = """
import socket, sys, time
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
started = time.perf_counter_ns()
for _ in range(n):
    s = socket.socket()
    s.connect_ex((host, port))
    s.close()
print((time.perf_counter_ns() - started) / n)
"""


def _block(pod, size, smallest):
    destination = DESTINATION
    if size == NOT_ENROLLED:
        enrollment.unenroll(netns_path=pod.netns_path)
        destination = ("127.0.0.1", abi.OUTBOUND_PORT)
    else:
        lists = with_istio_options(smallest) if size == WITH_OPTIONS else excluded_lists(size)
        enrollment.enroll(pod.netns_path, PodSettings(**lists), pod="bench/connect-cost")
    out = pod.run(sys.executable, "-c", _CONNECTS, str(CONNECTS), *map(str, destination), timeout=300)
    return float(out.stdout)


def run(rounds, sizes=SIZES, progress=print):
    plan = [NOT_ENROLLED, *sizes, WITH_OPTIONS]
    samples = {size: [] for size in plan}
    loader.unload()
    ensure.load(mode="ebpf")
    try:
        with labmod.Lab(prefix=f"icx{os.getpid() % 10000}", net=71) as lab:
            pod = lab.add_pod("a")
            try:
                for r in range(rounds):
                    k = r % len(plan)
                    for size in plan[k:] + plan[:k]:
                        samples[size].append(_block(pod, size, sizes[0]))
                    progress(f"connect cost round {r + 1}/{rounds}: " + ", ".join(
                        f"{_label(size, sizes[0])}: {samples[size][-1] / 1000:.2f} us" for size in plan))
            finally:
                enrollment.unenroll(netns_path=pod.netns_path)
    finally:
        loader.unload()
    return {"connects_per_block": CONNECTS, "samples": {str(k): v for k, v in samples.items()}}


def _label(size, smallest):
    return {NOT_ENROLLED: "not enrolled", WITH_OPTIONS: f"{smallest}+istio"}.get(size, str(size))


def render(results):
    samples = {int(k): v for k, v in results["samples"].items()}
    sizes = sorted(s for s in samples if s not in (NOT_ENROLLED, WITH_OPTIONS))
    base = samples[sizes[0]]
    lines = [f"== connect() refused after the hook redirected it, {results['connects_per_block']:,} "
             "per block, blocks interleaved; us per connect (socket to close), median (min-max)",
             f"{'lists':>14}{'us/connect':>12}{'min-max':>16}{'vs ' + str(sizes[0]) + ', per round':>22}"]
    for size in [NOT_ENROLLED, *sizes] + ([WITH_OPTIONS] if WITH_OPTIONS in samples else []):
        values = samples[size]
        deltas = [v - b for v, b in zip(values, base)]
        lines.append(f"{_label(size, sizes[0]):>14}{statistics.median(values) / 1000:>12.2f}"
                     f"{min(values) / 1000:>8.2f} - {max(values) / 1000:.2f}"
                     f"{statistics.median(deltas) / 1000:>+16.2f} us")
    return "\n".join(lines)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join("bench-results", "connect-cost")
    sizes = tuple(int(s) for s in sys.argv[3].split(",")) if len(sys.argv) > 3 else SIZES
    results = run(rounds, sizes)
    report.save(out_dir, results, render(results))


if __name__ == "__main__":
    main()
