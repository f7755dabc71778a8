"""The datapath compiled once, and judged by this kernel.

BCC compiles the C sources into one module (its maps created, its programs compiled but
not loaded); each program is then loaded from BCC's instructions through libbpf, so the
kernel's verifier judges exactly the code that will run, with the helpers, map types and
context accesses it really uses. A program the kernel refuses is recorded with the
verifier's reason in one line, and the plan (capabilities.choose) serves that program's
capability another way: no version table, no stand-in probe program can know what a
vendor's kernel build removed or backported.

The loader, an in-place upgrade and doctor all build here. BCC is imported only when a
Build is made: the CNI path never comes here.

INTERCEPTOR_REFUSE_PROGRAMS=xdp_ingress,tc_pod makes the kernel's answer a refusal for
the programs named, so every fallback can be exercised on a kernel that accepts them all.
"""
import os
import time

from interceptor.kernel import libbpf
from interceptor.datapath.insns import map_refs, set_imm64
from interceptor.datapath.maps import LAYOUT
from interceptor.datapath.programs import POD_COPY, PROGRAMS, TAIL

REFUSE_ENV = "INTERCEPTOR_REFUSE_PROGRAMS"


class BuildError(Exception):
    """The datapath does not compile (or lacks a map this code expects)."""


def refused_by_env():
    return {n.strip() for n in os.environ.get(REFUSE_ENV, "").split(",") if n.strip()}


class Build:
    """One compile of the datapath. `map_fds` are the compiled module's maps (BCC owns
    them); `load` loads programs against those or other maps; `close` releases both."""

    def __init__(self, host_netns_cookie, map_sizes=None):
        from bcc import BPF, lib as bcclib     # only here: compiling is a loader's job
        from interceptor.datapath.bpf_source import assemble, compile_flags
        started = time.monotonic()
        try:
            self.bpf = BPF(text=assemble().encode(), cflags=compile_flags(host_netns_cookie, map_sizes))
        except Exception as exc:     # BCC raises a bare Exception; the compiler wrote to stderr
            raise BuildError(f"the datapath does not compile: {exc}") from None
        self.compile_seconds = time.monotonic() - started
        self.host_netns_cookie = host_netns_cookie     # the cookie no hook ever acts on
        self.map_fds = {}
        for name in LAYOUT:
            fd = bcclib.bpf_table_fd(self.bpf.module, name.encode())
            if fd < 0:
                self.bpf.cleanup()
                raise BuildError(f"map {name} missing from the compiled datapath")
            self.map_fds[name] = fd
        self.programs = {}     # name -> fd of a loaded program (closed by close())
        self.refused = {}      # name -> the kernel's reason, in one line

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def insns(self, name, map_fds=None):
        """The program's instructions, its map references pointed at map_fds ({map
        name: fd}; by default this build's own maps)."""
        insns = bytearray(self.bpf.dump_func(name.encode()))
        if map_fds is not None:
            name_by_fd = {fd: n for n, fd in self.map_fds.items()}
            for i, fd in map_refs(insns).items():
                set_imm64(insns, i, map_fds[name_by_fd[fd]])
        return bytes(insns)

    def load(self, programs=PROGRAMS, map_fds=None):
        """Load each program (programs.Program) against map_fds (default: this build's
        maps). What the kernel accepts is in `programs` (a per-pod stub only for trial:
        enroll loads its copies), what it refuses in `refused`."""
        forced = refused_by_env()
        for prog in programs:
            if prog.name in self.programs or prog.name in self.refused:
                continue
            if prog.name in forced:
                self.refused[prog.name] = f"named in {REFUSE_ENV}"
                continue
            # tail-called programs keep expected_attach_type 0, as the stubs that call them
            attach = 0 if prog.scope in (TAIL, POD_COPY) else prog.attach_type
            try:
                fd = libbpf.prog_load(prog.prog_type, prog.name, self.insns(prog.name, map_fds), attach)
            except libbpf.VerifierRejection as exc:
                self.refused[prog.name] = exc.reason
                continue
            if prog.scope == POD_COPY:
                os.close(fd)
                fd = None
            self.programs[prog.name] = fd
        return self

    def fd(self, name):
        return self.programs[name]

    def close(self):
        for fd in self.programs.values():
            if fd is not None:
                os.close(fd)
        self.programs = {}
        self.bpf.cleanup()


def judge(host_netns_cookie):
    """{program name: reason} of every program this kernel refuses ({} when it takes
    them all); BuildError when the datapath does not compile."""
    with Build(host_netns_cookie) as build:
        return dict(build.load().refused)
