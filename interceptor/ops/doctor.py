"""`interceptor doctor`: ask the kernel, not a version table, what the datapath can use.

Each probe loads a two-instruction program of the right type and attaches it where the
datapath would (a throw-away child cgroup, a throw-away network namespace or veth), then
removes it. Nothing here compiles except the BCC probe, so doctor also works where BCC
cannot run. INTERCEPTOR_DISABLE_FEATURES=a,b makes probes report features absent, to
exercise fallbacks on a kernel that has them.
"""
import errno
import os
import platform
from contextlib import nullcontext
import subprocess
import time
from dataclasses import asdict, dataclass

from interceptor.kernel import libbpf, libc, mounts
from interceptor.kernel.libbpf import AttachType, MapType, ProgType
from interceptor.datapath.plan import Hook
from interceptor.ops.capabilities import Probe

DISABLE_ENV = "INTERCEPTOR_DISABLE_FEATURES"



@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: str = ""


@dataclass
class Report:
    kernel: str
    checks: list
    # {program: the kernel's reason} for the datapath's programs the verifier refused;
    # None when they were not judged (judged only by `doctor` itself, needing BCC)
    refused: dict = None
    programs_note: str = ""

    @property
    def by_name(self):
        return {c.name: c for c in self.checks}

    @property
    def ebpf_usable(self):
        from interceptor.ops.capabilities import ebpf_usable
        return ebpf_usable({c.name: c.ok for c in self.checks})

    def _choice(self):
        """(the Plan `load --mode auto` would make, or None and why not)."""
        from interceptor.ops.capabilities import choose
        try:
            return choose("auto", self, self.refused), ""
        except ValueError as exc:
            return None, str(exc)

    @property
    def plan(self):
        return self._choice()[0]

    @property
    def mode(self):
        plan, why = self._choice()
        return plan.mode if plan else f"unavailable ({why})"

    def to_json(self):
        plan = self.plan
        return {"kernel": self.kernel, "mode": self.mode, "ebpf_usable": self.ebpf_usable,
                "plan": plan.to_json(pieces=False) if plan else {"mode": self.mode},
                "bypass": plan.sockmap if plan else False,
                "checks": [asdict(c) for c in self.checks], "programs": self._programs()}

    def _programs(self):
        """[{name, accepted, reason}] of the datapath's programs, as the verifier judged
        them ([] when not judged)."""
        from interceptor.datapath.programs import PROGRAMS
        if self.refused is None:
            return []
        return [{"name": p.name, "accepted": p.name not in self.refused,
                 "reason": self.refused.get(p.name, "")} for p in PROGRAMS]

    def render(self):
        lines = [f"{'Kernel:':<16}{self.kernel}", ""]
        for c in self.checks:
            state = "OK" if c.ok else "missing"
            lines.append(f"{c.name:<16}{state:<9}{c.detail}")
            if c.warning:
                lines.append(f"{'':<25}warning: {c.warning}")
        lines += ["", "Programs (the datapath as compiled, judged by this kernel's verifier):"]
        if self.refused is None:
            lines.append(f"  not judged: {self.programs_note or 'BCC cannot compile here'}")
        else:
            for p in self._programs():
                lines.append(f"  {p['name']:<14}{'OK' if p['accepted'] else 'refused':<9}{p['reason']}")
        plan = self.plan
        lines += ["", f"{'Mode:':<16}{self.mode}"]
        if plan:
            lines += [f"{'Outbound:':<16}{plan.outbound}", f"{'Inbound:':<16}{plan.inbound}",
                      f"{'Bypass:':<16}{'ebpf' if plan.bypass else 'off'}",
                      f"{'Ingress filter:':<16}{_ingress_text(plan)}",
                      f"{'Rules backend:':<16}{plan.rules_backend or '-'}"]
            fallbacks = plan.fallbacks()
            if fallbacks:
                lines += ["", "Fallbacks:"] + [f"  {line}" for line in fallbacks]
        return "\n".join(lines)


def _ingress_text(plan):
    hooks = plan.bpf_filter_hooks
    if hooks == [Hook.TC, Hook.XDP]:
        return "tc on veth, XDP (native, else generic) on other drivers"
    if hooks:
        return f"{hooks[0]} on every interface"
    return plan.ingress or "off (no BPF filter, no nftables)"


def disabled_features():
    return {f.strip() for f in os.environ.get(DISABLE_ENV, "").split(",") if f.strip()}


def run(only=None, judge_programs=False):
    """Every probe, or only those named in `only`; with judge_programs, the datapath is
    compiled and each of its programs loaded, so the plan shown is the one `load` would
    choose (the loader judges its own build itself)."""
    disabled = disabled_features()
    checks = []

    def probe(name, fn):
        if only is not None and name not in only:
            return
        if name in disabled:
            checks.append(Check(name, False, f"disabled by {DISABLE_ENV}"))
            return
        try:
            result = fn()
        except OSError as exc:
            checks.append(Check(name, False, exc.strerror or str(exc)))
            return
        except Exception as exc:   # a probe must never take doctor down
            checks.append(Check(name, False, str(exc)))
            return
        detail, warning = result if isinstance(result, tuple) else (result, "")
        checks.append(Check(name, True, detail, warning))

    probe(Probe.BPFFS, _probe_bpffs)
    probe(Probe.CGROUP2, _probe_cgroup2)
    hooks = (Probe.CONNECT4, Probe.CONNECT6, Probe.GETPEERNAME, Probe.GETSOCKOPT, Probe.SOCK_OPS)
    with (_scratch_cgroup() if only is None or set(hooks) & set(only) else nullcontext()) as cg:
        probe(Probe.CONNECT4, lambda: _probe_cgroup_hook(cg, ProgType.CGROUP_SOCK_ADDR,
                                                     AttachType.CGROUP_INET4_CONNECT))
        probe(Probe.CONNECT6, lambda: _probe_cgroup_hook(cg, ProgType.CGROUP_SOCK_ADDR,
                                                     AttachType.CGROUP_INET6_CONNECT))
        probe(Probe.GETPEERNAME, lambda: _probe_cgroup_hook(cg, ProgType.CGROUP_SOCK_ADDR,
                                                        AttachType.CGROUP_INET4_GETPEERNAME))
        probe(Probe.GETSOCKOPT, lambda: _probe_cgroup_hook(cg, ProgType.CGROUP_SOCKOPT,
                                                       AttachType.CGROUP_GETSOCKOPT))
        probe(Probe.SOCK_OPS, lambda: _probe_cgroup_hook(cg, ProgType.SOCK_OPS,
                                                     AttachType.CGROUP_SOCK_OPS))
    probe(Probe.SOCKMAP, _probe_sockmap)
    probe(Probe.SK_LOOKUP, _probe_sk_lookup)
    probe(Probe.NETNS_COOKIE, _probe_netns_cookie)
    probe(Probe.XDP_NATIVE, lambda: _probe_xdp(native=True))
    probe(Probe.XDP_GENERIC, lambda: _probe_xdp(native=False))
    probe(Probe.BCC_COMPILE, _probe_bcc)
    probe(Probe.NFTABLES, _probe_nftables)
    probe(Probe.IPTABLES, _probe_iptables)
    report = Report(kernel=platform.release(), checks=checks)
    if judge_programs:
        _judge_programs(report)
    return report


def _judge_programs(report):
    """Compile the datapath and load each program (build.py): the verifier's verdicts."""
    ok = {c.name: c.ok for c in report.checks}
    if not ok.get(Probe.BCC_COMPILE):
        report.programs_note = "BCC cannot compile here (see bcc_compile)"
        return
    from interceptor.kernel import netns
    from interceptor.datapath.build import BuildError, judge
    try:
        report.refused = judge(netns.host_cookie())
    except BuildError as exc:
        report.programs_note = str(exc)
    except OSError as exc:
        report.programs_note = f"cannot load programs: {exc.strerror or exc}"


# --- probes ---------------------------------------------------------------------------
def _probe_bpffs():
    where = mounts.find("bpf")
    if where:
        return f"mounted at {where}"
    return "not mounted; `interceptor load` mounts it at /sys/fs/bpf"


def _probe_cgroup2():
    where = mounts.find("cgroup2")
    if where:
        return f"mounted at {where}"
    return "no cgroup2 mount; `interceptor load` mounts one at /run/interceptor/cgroup2"


class _scratch_cgroup:
    """A throw-away child cgroup to attach probe programs to (never the root: a probe
    must not affect any real process)."""

    def __enter__(self):
        self.path = None
        self.tmp_mount = None
        root = mounts.find("cgroup2")
        try:
            if root is None:
                self.tmp_mount = f"/run/interceptor/doctor-cgroup2-{os.getpid()}"
                os.makedirs(self.tmp_mount, exist_ok=True)
                libc.call("mount cgroup2", "mount", b"cgroup2", self.tmp_mount.encode(),
                          b"cgroup2", 0, None)
                root = self.tmp_mount
            self.path = os.path.join(root, f"interceptor-doctor-{os.getpid()}")
            os.makedirs(self.path, exist_ok=True)
        except OSError:
            self.path = None
        return self.path

    def __exit__(self, *exc):
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError:
                pass
        if self.tmp_mount:
            try:
                libc.call("umount cgroup2", "umount2", self.tmp_mount.encode(), 2)
            except OSError:
                pass
            try:
                os.rmdir(self.tmp_mount)
            except OSError:
                pass


def _load_with_netns_cookie(prog_type, attach_type, return_value):
    """A probe program that calls bpf_get_netns_cookie, as every hook of the datapath
    does (it is how a hook knows the pod): a kernel that has the program type but not
    the helper for it (sock_ops and sk_msg before 5.15, sockopt before 5.14) cannot run
    the datapath's program, and says so here."""
    try:
        return libbpf.load_helper_probe_prog(prog_type, attach_type, return_value,
                                             libbpf.HELPER_GET_NETNS_COOKIE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        os.close(libbpf.load_trivial_prog(prog_type, attach_type, return_value))  # the type alone?
        raise OSError(errno.EINVAL, "the program type loads, but without bpf_get_netns_cookie "
                                    "(which the datapath's program needs)") from None


def _probe_cgroup_hook(cgroup, prog_type, attach_type):
    if cgroup is None:
        raise OSError(0, "no cgroup2 hierarchy to attach to")
    prog = _load_with_netns_cookie(prog_type, attach_type, 1)
    try:
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = libbpf.link_create(prog, cg, attach_type)
            os.close(link)
        finally:
            os.close(cg)
    finally:
        os.close(prog)
    return "loads and attaches to a cgroup"


def _probe_sockmap():
    m = libbpf.map_create(MapType.SOCKHASH, 4, 4, 1)
    try:
        prog = _load_with_netns_cookie(ProgType.SK_MSG, AttachType.SK_MSG_VERDICT, 1)
        try:
            libbpf.prog_attach(prog, m, AttachType.SK_MSG_VERDICT)
            libbpf.prog_detach(prog, m, AttachType.SK_MSG_VERDICT)
        finally:
            os.close(prog)
    finally:
        os.close(m)
    return "sockhash + sk_msg verdict attach"


def _in_scratch_netns(fn):
    """Run fn() in a forked child inside a new network namespace; returns its errno
    (0 on success). Our own namespace is never changed."""
    pid = os.fork()
    if pid == 0:   # child
        code = 0
        try:
            libc.call("unshare", "unshare", 0x40000000)
            fn()
        except OSError as exc:
            code = exc.errno or 1
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _probe_sk_lookup():
    prog = libbpf.load_trivial_prog(ProgType.SK_LOOKUP, AttachType.SK_LOOKUP, 1)
    try:
        def attach():
            ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            os.close(libbpf.link_create(prog, ns, AttachType.SK_LOOKUP))
        err = _in_scratch_netns(attach)
    finally:
        os.close(prog)
    if err:
        raise OSError(err, f"attach to a network namespace: {os.strerror(err)}")
    return "loads and attaches to a network namespace"


def _probe_netns_cookie():
    from interceptor.kernel import netns
    cookie = netns.current_cookie()
    return f"from {netns.cookie_source()} (this namespace: {cookie})"


def _probe_xdp(native):
    from interceptor.pieces.xdp import MODE_FLAGS
    flags = MODE_FLAGS["native" if native else "generic"]
    prog = libbpf.load_trivial_prog(ProgType.XDP, 0, 2)
    try:
        def attach():
            subprocess.run(["ip", "link", "add", "ic0", "type", "veth", "peer", "name", "ic1"],
                           check=True, capture_output=True)
            subprocess.run(["ip", "link", "set", "ic0", "up"], check=True, capture_output=True)
            subprocess.run(["ip", "link", "set", "ic1", "up"], check=True, capture_output=True)
            libbpf.xdp_attach(socket_if_index("ic0"), prog, flags)
        err = _in_scratch_netns(attach)
    finally:
        os.close(prog)
    if err:
        raise OSError(err, f"attach to a veth: {os.strerror(err)}")
    return f"{'native (driver)' if native else 'generic (skb)'} mode on veth"


def _probe_nftables():
    import shutil
    if not shutil.which("nft"):
        raise OSError(0, "nft is not installed")

    def nat_table():
        subprocess.run(["nft", "add table inet ic_probe; add chain inet ic_probe o "
                        "{ type nat hook output priority -100; }"], check=True, capture_output=True)
    err = _in_scratch_netns(nat_table)
    if err:
        raise OSError(err, "cannot create an inet nat table")
    return "inet nat table with REDIRECT (preferred fallback)"


def _probe_iptables():
    from interceptor.kernel.rules import iptables_backends
    usable = []
    for backend in iptables_backends():
        def nat_chain(b=backend):
            subprocess.run([f"iptables-{b}", "-t", "nat", "-N", "IC_PROBE"], check=True,
                           capture_output=True)
        if _in_scratch_netns(nat_chain) == 0:
            usable.append(backend)
    if not usable:
        raise OSError(0, "no working iptables (legacy or nft backend)")
    return "backends: " + ", ".join(usable)


def socket_if_index(name):
    import socket
    return socket.if_nametoindex(name)


# Where the agent's image keeps the headers BCC compiles against (deploy/Containerfile
# sets BCC_KERNEL_SOURCE to it), and the file naming the kernel they came from.
HEADERS_RELEASE_FILE = "KERNEL_RELEASE"


def headers_note():
    """Which kernel the headers BCC compiles against belong to, and a warning when that
    is not the running kernel (borrowed headers: fine for UAPI-only programs like ours).
    BCC_KERNEL_SOURCE (the image's own headers) first, else the node's build tree."""
    release = platform.release()
    shipped = os.environ.get("BCC_KERNEL_SOURCE")
    if shipped:
        if not os.path.isfile(os.path.join(shipped, "include", "linux", "kconfig.h")):
            raise OSError(0, f"BCC_KERNEL_SOURCE={shipped} holds no kernel headers (include/linux/kconfig.h)")
        try:
            with open(os.path.join(shipped, HEADERS_RELEASE_FILE)) as f:
                name = f.read().strip()
        except OSError:
            name = os.path.basename(shipped.rstrip("/"))
        target = shipped
    else:
        build = f"/lib/modules/{release}/build"
        if not os.path.exists(build):
            raise OSError(0, f"{build} is missing (make setup links Debian's headers there; the "
                             "agent's image brings its own)")
        target = os.path.realpath(build)
        name = os.path.basename(target)
    if release in name:
        return f"headers {target}", ""
    return (f"headers {target}",
            f"headers belong to another kernel ({name.replace('linux-headers-', '')}, running "
            f"{release}); fine for the UAPI-only datapath")


def _probe_bcc():
    detail, warning = headers_note()
    try:
        from bcc import BPF
    except ImportError as exc:
        raise OSError(0, f"BCC Python bindings missing ({exc}); install python3-bpfcc") from exc
    started = time.monotonic()
    b = BPF(text=b"int probe(void *ctx) { return 0; }")
    b.cleanup()
    return f"{detail}, compile {time.monotonic() - started:.2f}s", warning
