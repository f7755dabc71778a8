"""What each BPF program cost while a command ran: the kernel's own run counters
(kernel.bpf_stats_enabled), per program, for the programs loaded during the command.

    sudo .venv/bin/python scripts/bpf_run_time.py -- .venv/bin/interceptor bench crr ...

bpftool is polled while the command runs (the benchmark unloads its datapath at the
end), and the last figures seen for each program id are summed by program name. The
statistics are switched off again afterwards; they cost a little per run while on, so
the command's own numbers are slightly lower than without them.
"""
import json
import subprocess
import sys
import threading
import time

STATS = "/proc/sys/kernel/bpf_stats_enabled"


def programs():
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
    try:
        return json.loads(out)
    except ValueError:
        return []


def main(argv):
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    before = {p["id"] for p in programs()}
    seen, done = {}, threading.Event()

    def poll():
        while not done.is_set():
            for p in programs():
                if p.get("run_cnt") and p["id"] not in before:
                    seen[p["id"]] = (p.get("name", "?"), p["type"], p["run_cnt"], p["run_time_ns"])
            time.sleep(0.3)

    with open(STATS, "w") as f:
        f.write("1")
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        rc = subprocess.run(argv).returncode
    finally:
        done.set()
        poller.join()
        with open(STATS, "w") as f:
            f.write("0")
    totals = {}
    for name, kind, runs, ns in seen.values():
        r, n = totals.get((name, kind), (0, 0))
        totals[(name, kind)] = (r + runs, n + ns)
    print(f"{'program':<18}{'type':<20}{'runs':>10}{'total ms':>10}{'ns/run':>8}")
    for (name, kind), (runs, ns) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<18}{kind:<20}{runs:>10}{ns / 1e6:>10.1f}{ns / runs:>8.0f}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
