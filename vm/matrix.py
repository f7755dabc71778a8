"""`make vm-test`: the kernel matrix. Boots the guest image (vm/build-image.sh) on each of
its kernels and collects what the guest's run (vm/guest/.../interceptor-vm/run) found:
`interceptor doctor`, then `interceptor selfcheck` in each mode with each sidecar (HAProxy,
and Envoy as Istio configures it). Prints one table (kernel x capability, the mode chosen
for each capability, the result of each check) and writes it as JSON.

    python vm/matrix.py [--kernels 5.10,6.1,6.12] [--modes auto,nftables,iptables]
                        [--proxies haproxy,envoy] [--out DIR]

KVM is used when it works, decided by trying (a KVM guest that shows no kernel output
within a short wait is abandoned for TCG, QEMU's emulation). Guests run from a snapshot of
the image, so the image is never changed; each guest is ended by its own PID.
"""
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from interceptor.datapath.plan import from_json_or_none  # noqa: E402
from interceptor.harness.selfcheck import ENVOY_STEPS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_DIR = os.environ.get("INTERCEPTOR_VM_DIR", os.path.join(HERE, "..", "build", "vm"))
DEFAULT_KERNELS = ("5.10", "6.1", "6.12")
DEFAULT_MODES = ("auto", "nftables", "iptables")
PROXIES = ("haproxy", "envoy")
KVM_PROBE_S = 15              # a working KVM guest prints its banner in well under a second
GUEST_TIMEOUT_S = 40 * 60     # one kernel's whole run under TCG: boot, doctor, BCC, checks
MEMORY_MB = 2048
# selfcheck's steps in their order (Envoy's, which has HAProxy's and the self-call); a run
# that stopped early reports "unexpected"
SELFCHECK_STEPS = (*ENVOY_STEPS[:-1], "unexpected", ENVOY_STEPS[-1])


@dataclass
class KernelRun:
    """One guest: what it reported, or why it reported nothing."""
    release: str
    accel: str
    seconds: float = 0.0
    doctor: dict = field(default_factory=dict)
    selfchecks: list = field(default_factory=list)     # {"mode", "proxy", "exit", "seconds", "result"}
    error: str = ""

    @property
    def ok(self):
        return not self.error and bool(self.selfchecks) and \
            all(s["exit"] == 0 and s["result"].get("ok") for s in self.selfchecks)


def kernels(image_dir, wanted):
    """{release: (vmlinuz, initrd)} for each wanted version prefix ("5.10" -> 5.10.0-...)."""
    boot = os.path.join(image_dir, "boot")
    found = {}
    for name in sorted(os.listdir(boot)):
        if name.startswith("vmlinuz-"):
            release = name[len("vmlinuz-"):]
            found[release] = (os.path.join(boot, name), os.path.join(boot, f"initrd.img-{release}"))
    chosen = {}
    for prefix in wanted:
        match = [r for r in found if r.startswith(prefix + ".") or r.startswith(prefix + "-")]
        if not match:
            raise SystemExit(f"vm-test: no kernel {prefix} in {boot} (have: {', '.join(found)}); "
                             "run `make vm-image`")
        chosen[match[0]] = found[match[0]]
    return chosen


def qemu_argv(accel, kernel, initrd, append, console, extra=()):
    return ["qemu-system-x86_64", "-accel", accel, "-smp", "2", "-m", str(MEMORY_MB),
            "-display", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", append, "-serial", f"file:{console}", *extra]


def kvm_works(kernel, initrd, workdir):
    """Boot the kernel alone (no disk: it panics at mounting root, and -no-reboot ends
    QEMU) under KVM and watch for its banner."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    console = os.path.join(workdir, "kvm-probe.log")
    proc = subprocess.Popen(qemu_argv("kvm", kernel, initrd, "console=ttyS0 panic=-1", console,
                                      ["-nic", "none"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KVM_PROBE_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(console) and b"Linux version" in open(console, "rb").read():
                return True
            time.sleep(0.5)
        return os.path.exists(console) and b"Linux version" in open(console, "rb").read()
    finally:
        _end(proc)


def _end(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def boot(release, kernel, initrd, accel, modes, proxies, workdir, disk, log):
    """One guest, from a snapshot of the disk; returns its KernelRun."""
    run = KernelRun(release=release, accel=accel)
    console = os.path.join(workdir, f"console-{release}.log")
    results = os.path.join(workdir, f"results-{release}.jsonl")
    append = (f"root=/dev/vda rw console=ttyS0 quiet systemd.show_status=false "
              f"interceptor.run={','.join(modes)} interceptor.proxies={','.join(proxies)}")
    argv = qemu_argv(accel, kernel, initrd, append, console,
                     ["-serial", f"file:{results}", "-nic", "none",
                      "-drive", f"file={disk},if=virtio,format=qcow2,snapshot=on"])
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, stderr = proc.communicate(timeout=GUEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        run.error = f"no result within {GUEST_TIMEOUT_S} s"
        stderr = b""
    finally:
        _end(proc)
    run.seconds = round(time.monotonic() - started, 1)
    lines = []
    if os.path.exists(results):
        for raw in open(results, errors="replace").read().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                pass              # a partial line of a guest that died mid-write
    kinds = [entry["kind"] for entry in lines]
    for entry in lines:
        if entry["kind"] == "doctor":
            run.doctor = entry["result"]
        elif entry["kind"] == "selfcheck":
            run.selfchecks.append({"proxy": "haproxy",      # (a guest of before proxies)
                                   **{k: entry[k] for k in ("mode", "proxy", "exit", "seconds", "result")
                                      if k in entry}})
    if not run.error and "end" not in kinds:
        run.error = ("the guest stopped before finishing" if "begin" in kinds else
                     "the guest never started its run") + \
            f" (QEMU exit {proc.returncode}{': ' + stderr.decode(errors='replace').strip()[-300:] if stderr else ''};" \
            f" console: {console})"
    log(f"vm-test: {release} ({accel}) {'ok' if run.ok else 'FAILED'} in {run.seconds:.0f} s")
    return run


# --- the table ---------------------------------------------------------------------------
def table(runs):
    """Rows: each doctor capability, the plan doctor's report gives (mode per capability),
    then each selfcheck step per mode and sidecar; one column per kernel."""
    releases = [r.release for r in runs]
    rows = []
    capabilities = []
    for r in runs:
        for c in r.doctor.get("checks", []):
            if c["name"] not in capabilities:
                capabilities.append(c["name"])
    for name in capabilities:
        rows.append((name, [_capability(r, name) for r in runs]))
    rows.append(("", ["" for _ in runs]))
    rows.append(("programs refused", [_refused(r) for r in runs]))
    rows.append(("", ["" for _ in runs]))
    for key in ("mode", "outbound", "inbound", "ingress", "filter_hooks", "sockmap"):
        rows.append((f"plan: {key}", [_plan_value(r.doctor.get("plan", {}), key) for r in runs]))
    checks = []
    for r in runs:
        for s in r.selfchecks:
            if (s["mode"], s["proxy"]) not in checks:
                checks.append((s["mode"], s["proxy"]))
    for check in checks:
        rows.append(("", ["" for _ in runs]))
        rows.append((_check_name(*check), [_chosen(r, *check) for r in runs]))
        rows.append(("  (outbound, inbound, filter)", ["" for _ in runs]))
        steps = list(SELFCHECK_STEPS)
        for r in runs:
            for s in _selfcheck(r, *check).get("steps", []):
                if s["name"] not in steps:
                    steps.append(s["name"])
        for step in steps:
            cells = [_step(r, *check, step) for r in runs]
            if any(c != "-" for c in cells):
                rows.append((f"  {step}", cells))
    rows.append(("", ["" for _ in runs]))
    rows.append(("result", [("PASS" if r.ok else "FAIL") + f" ({r.accel}, {r.seconds:.0f} s)" for r in runs]))
    width = max(len(name) for name, _ in rows) + 2
    cols = [max(len(rel), *(len(cells[i]) for _, cells in rows)) + 2 for i, rel in enumerate(releases)]
    out = ["".ljust(width) + "".join(rel.ljust(w) for rel, w in zip(releases, cols))]
    for name, cells in rows:
        out.append(name.ljust(width) + "".join(c.ljust(w) for c, w in zip(cells, cols)))
    for r in runs:
        if r.error:
            out.append(f"{r.release}: {r.error}")
        for s in r.selfchecks:
            for step in s["result"].get("steps", []):
                if not step["ok"]:
                    out.append(f"{r.release} {_check_name(s['mode'], s['proxy'])[len('selfcheck '):]} "
                               f"{step['name']}: {step['detail']}")
    return "\n".join(out)


def host_run(modes, proxies, log):
    """The machine's own kernel, as a column beside the guests' (no VM: doctor and
    selfcheck run here; its kernel build is the one this machine kind boots)."""
    import platform
    cli = [sys.executable, "-m", "interceptor.cli"]
    run = KernelRun(release=platform.release(), accel="host")
    started = time.monotonic()
    p = subprocess.run(cli + ["doctor", "-o", "json"], capture_output=True, text=True)
    try:
        run.doctor = json.loads(p.stdout)
    except ValueError:
        run.error = f"doctor printed no report: {p.stderr.strip()[-300:]}"
    for mode in modes:
        for proxy in proxies:
            t = time.monotonic()
            p = subprocess.run(cli + ["selfcheck", "--mode", mode, "--proxy", proxy, "-o", "json"],
                               capture_output=True, text=True, timeout=GUEST_TIMEOUT_S)
            try:
                result = json.loads(p.stdout)
            except ValueError:
                result = {"ok": False, "steps": []}
                run.error = f"{_check_name(mode, proxy)} printed no report: {p.stderr.strip()[-300:]}"
            run.selfchecks.append({"mode": mode, "proxy": proxy, "exit": p.returncode,
                                   "seconds": round(time.monotonic() - t, 1), "result": result})
    run.seconds = round(time.monotonic() - started, 1)
    log(f"vm-test: {run.release} (this machine's kernel) {'ok' if run.ok else 'FAILED'} in {run.seconds:.0f} s")
    return run


def _refused(run):
    names = [p["name"] for p in run.doctor.get("programs", []) if not p["accepted"]]
    if not run.doctor.get("programs"):
        return "-"
    return ", ".join(names) if names else "none"


def _capability(run, name):
    for c in run.doctor.get("checks", []):
        if c["name"] == name:
            return "yes" if c["ok"] else "NO"
    return "-"


def _check_name(mode, proxy):
    return f"selfcheck --mode {mode}" + ("" if proxy == "haproxy" else f" --proxy {proxy}")


def _selfcheck(run, mode, proxy):
    return next((s["result"] for s in run.selfchecks if (s["mode"], s["proxy"]) == (mode, proxy)), {})


def _chosen(run, mode, proxy):
    plan = from_json_or_none(_selfcheck(run, mode, proxy).get("plan"))
    if plan is None:
        return "-"
    return f"{plan.mode}: {plan.outbound}, {plan.inbound}, {plan.filter_text()}"


def _plan_value(doc, key):
    """One field of the plan a guest's doctor reported ("-" when it made none)."""
    plan = from_json_or_none(doc)
    if plan is None:
        return str(doc.get("mode", "-")) if key == "mode" and doc else "-"
    value = getattr(plan, key)
    return "/".join(map(str, value)) or "none" if isinstance(value, tuple) else str(value)


def _step(run, mode, proxy, name):
    for s in _selfcheck(run, mode, proxy).get("steps", []):
        if s["name"] == name:
            return "ok" if s["ok"] else "FAIL"
    return "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(DEFAULT_KERNELS),
                    help="kernel versions, by prefix (default: %(default)s)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="selfcheck modes per kernel (default: %(default)s)")
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help="the sidecars each mode's selfcheck runs (default: %(default)s)")
    ap.add_argument("--out", help="directory for matrix.json, matrix.txt and the guests' "
                                  "console logs (default: a temporary directory, kept)")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--host", action="store_true",
                    help="also this machine's own kernel, as a column (doctor and selfcheck here)")
    ap.add_argument("--probe-accel", action="store_true",
                    help="only say which accelerator works here: kvm or tcg (vagrant/run-bench.sh)")
    args = ap.parse_args(argv)
    if args.probe_accel:
        first = next(iter(kernels(IMAGE_DIR, DEFAULT_KERNELS[1:2]).values()))
        with tempfile.TemporaryDirectory() as scratch:
            print("kvm" if kvm_works(*first, scratch) else "tcg")
        return 0
    wanted = [k for k in args.kernels.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    proxies = [p for p in args.proxies.split(",") if p]
    bad = [m for m in modes if m not in ("auto", "ebpf", "nftables", "iptables")]
    bad_proxies = [p for p in proxies if p not in PROXIES]
    if bad or bad_proxies or not modes or not wanted or not proxies:
        ap.error(f"unknown mode(s) {', '.join(bad)}" if bad else
                 f"unknown proxy(ies) {', '.join(bad_proxies)}" if bad_proxies else
                 "name at least one kernel, mode and proxy")
    disk = os.path.join(IMAGE_DIR, "disk.qcow2")
    if not os.path.exists(disk):
        raise SystemExit(f"vm-test: no image at {disk}; run `make vm-image`")
    chosen = kernels(IMAGE_DIR, wanted)
    out = args.out or tempfile.mkdtemp(prefix="interceptor-vm-test-")
    os.makedirs(out, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    accel = args.accel
    if accel == "auto":
        first = next(iter(chosen.values()))
        accel = "kvm" if kvm_works(*first, out) else "tcg"
        log(f"vm-test: {'KVM works' if accel == 'kvm' else 'no usable KVM: TCG (emulation, ~8x slower)'}")
    runs = [boot(release, kernel, initrd, accel, modes, proxies, out, disk, log)
            for release, (kernel, initrd) in chosen.items()]
    if args.host:
        runs.append(host_run(modes, proxies, log))
    text = table(runs)
    print(text)
    with open(os.path.join(out, "matrix.json"), "w") as f:
        json.dump([dataclasses.asdict(r) | {"ok": r.ok} for r in runs], f, indent=1)
    with open(os.path.join(out, "matrix.txt"), "w") as f:
        f.write(text + "\n")
    log(f"vm-test: results in {out}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
