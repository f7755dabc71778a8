"""Load generators and CPU accounting, run inside the client pod."""
import json
import os
import re

CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(pod, url, connections, seconds, close=False):
    """HTTP requests/s and latency percentiles (wrk, one thread: the machine has two
    cores and the proxies need the other)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    out = pod.run(*argv, url, timeout=seconds + 60).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    kinds = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    result["socket_errors"] = sum(kinds.values())
    result["socket_error_kinds"] = kinds
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["bad_responses"] = int(m.group(1)) if m else 0
    return result


def iperf3(pod, host, port, seconds):
    """Bulk throughput. A failed run is a sample too ({"gbit_s": None, "error": ...}):
    iperf3's blocking control socket is one of the things the bypass can break."""
    p = pod.run("iperf3", "-c", str(host), "-p", str(port), "-t", str(seconds), "-J",
                timeout=seconds + 60, check=False)
    doc = {}
    try:
        doc = json.loads(p.stdout)
        received = doc["end"]["sum_received"]
        return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}
    except (ValueError, KeyError, TypeError):
        error = doc.get("error") if isinstance(doc, dict) else None
        return {"gbit_s": None, "bytes": 0,
                "error": error or p.stderr.strip() or f"iperf3 exit {p.returncode}"}


def machine_ticks():
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq = map(int, fields[:7])
    return {"busy": user + nice + system + irq + softirq, "kernel": system + irq + softirq}


def _proc_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])     # utime + stime
    except OSError:
        return 0


class CpuMeter:
    """CPU seconds spent during a run: by the sidecar processes, in the kernel (system,
    irq and softirq of the whole machine: softirq is charged to whoever was interrupted,
    so per-process figures cannot separate it), and in total."""

    def __init__(self, sidecar_pids):
        self.pids = sidecar_pids

    def __enter__(self):
        self.m0 = machine_ticks()
        self.p0 = sum(_proc_ticks(p) for p in self.pids)
        return self

    def __exit__(self, *exc):
        m1 = machine_ticks()
        self.sidecars_s = (sum(_proc_ticks(p) for p in self.pids) - self.p0) / CLK_TCK
        self.kernel_s = (m1["kernel"] - self.m0["kernel"]) / CLK_TCK
        self.total_s = (m1["busy"] - self.m0["busy"]) / CLK_TCK

    def per(self, units):
        """CPU milliseconds per unit of work."""
        if not units:
            return {"sidecars_ms": None, "kernel_ms": None, "total_ms": None}
        return {"sidecars_ms": 1000 * self.sidecars_s / units, "kernel_ms": 1000 * self.kernel_s / units,
                "total_ms": 1000 * self.total_s / units}
