"""Upgrading a loaded datapath in place: this version's programs take the place of the
loaded ones inside the existing links, so every enrolled pod stays intercepted and no
established connection breaks (the maps, which hold the pods and the connections'
original destinations, are kept).

1. Compile this version with BCC (its maps are throwaway).
2. Check each pinned map against the compiled one (type, key and value size, capacity,
   flags). A map whose layout changed would need migrating: not done here, so the
   upgrade is refused with nothing changed.
3. Load every program from BCC's instructions with their map references pointed at the
   pinned maps (insns.py), all of them before anything is swapped: a verifier rejection
   also changes nothing.
4. Swap: bpf_link_update on the cgroup links and on each pod's sk_lookup link, the XDP
   filter in the xdp_main program array (the pods' stubs tail-call it), the sk_msg
   program on the bypass sockhash; re-pin the programs; save the new XDP stub template
   (for pods enrolled from now on); record the new datapath version.
"""
import ctypes
import errno
import os
import time

from . import libbpf, paths, state
from .bpf_source import datapath_version
from .insns import map_refs, set_imm64
from .maps import LAYOUT
from .pieces import SK_LOOKUP_LINK
from .capabilities import uses_bpf
from .programs import BYPASS_MAP, CGROUP, NETNS, POD_COPY, PROGRAMS, SOCKHASH, TAIL, XDP_MAIN_MAP


class UpgradeError(Exception):
    pass


def upgrade(log=lambda msg: None):
    """Returns a summary; UpgradeError when it cannot be done (then nothing changed)."""
    from . import loader
    with state.node_lock():
        if not loader.is_loaded():
            raise UpgradeError("nothing is loaded to upgrade")
        node = loader.node_state()
        plan = node["plan"]
        ours, theirs = datapath_version(), node.get("datapath_version")
        if ours == theirs and not node.get("upgrading_to"):
            return "already this version"
        if not uses_bpf(plan):
            _record(node, ours)
            return f"rules only: version {theirs} -> {ours}"
        started = time.monotonic()
        summary = _swap(node, plan, ours, log)
        _record(node, ours)
        return f"datapath {theirs} -> {ours} in place: {summary} ({time.monotonic() - started:.2f}s)"


def _record(node, version):
    node["datapath_version"] = version
    node["upgraded_at"] = time.time()
    node.pop("upgrading_to", None)
    state.write_json(paths.NODE_STATE, node)


def _swap(node, plan, version, log):
    from bcc import BPF, lib as bcclib
    from .bpf_source import assemble
    from .loader import save_pod_template
    try:
        bpf = BPF(text=assemble().encode(), cflags=[f"-DHOST_NETNS_COOKIE={node['host_netns_cookie']}"])
    except Exception as exc:      # BCC raises a bare Exception; the compiler's errors went to stderr
        raise UpgradeError(f"the new datapath does not compile: {exc}") from None
    pinned, new = {}, {}
    try:
        compiled = {}
        for name in LAYOUT:
            fd = bcclib.bpf_table_fd(bpf.module, name.encode())
            if fd < 0:
                raise UpgradeError(f"map {name} missing from the compiled datapath")
            compiled[name] = fd
            pinned[name] = libbpf.obj_get(paths.map_pin(name))
            _same_layout(name, compiled[name], pinned[name])
        name_by_fd = {fd: name for name, fd in compiled.items()}
        for prog in PROGRAMS:
            if not prog.loaded(plan) or prog.scope == POD_COPY:
                continue
            insns = bytearray(bpf.dump_func(prog.name.encode()))
            for i, fd in map_refs(insns).items():
                set_imm64(insns, i, pinned[name_by_fd[fd]])
            attach = 0 if prog.scope == TAIL else prog.attach_type
            try:
                new[prog.name] = libbpf.prog_load(prog.prog_type, prog.name, bytes(insns), attach)
            except OSError as exc:
                raise UpgradeError(f"{prog.name} of the new datapath does not load: {exc}") from None
        # everything verified: swap. Journalled first: killed half-way, the links hold
        # programs of two builds, which status reports and the next upgrade completes.
        node["upgrading_to"] = version
        state.write_json(paths.NODE_STATE, node)
        swapped = 0
        for prog in PROGRAMS:
            fd = new.get(prog.name)
            if fd is None:
                continue
            if prog.scope == CGROUP and prog.needed(plan):
                swapped += _update_link(paths.link_pin(prog.name), fd)
            elif prog.scope == NETNS:
                for cookie in sorted(paths.pinned_pod_cookies()):
                    swapped += _update_link(paths.pod_link_pin(cookie, SK_LOOKUP_LINK), fd)
            elif prog.scope == TAIL:
                libbpf.map_update(pinned[XDP_MAIN_MAP], ctypes.c_uint32(0), ctypes.c_uint32(fd))
                swapped += 1
            elif prog.scope == SOCKHASH and node.get("bypass"):
                libbpf.prog_attach(fd, pinned[BYPASS_MAP], prog.attach_type)    # replaces the old
                swapped += 1
            # pinned beside, then renamed over: the pin is never missing, so a kill here
            # cannot leave a load that `is_loaded` calls incomplete
            staged = paths.prog_pin(prog.name) + "_upgrading"     # bpffs refuses dots
            if os.path.lexists(staged):
                os.unlink(staged)
            libbpf.obj_pin(fd, staged)
            os.replace(staged, paths.prog_pin(prog.name))
        for prog in PROGRAMS:
            if prog.scope == POD_COPY and prog.needed(plan):
                save_pod_template(bpf, prog, {fd: name for name, fd in compiled.items()})
        log(f"replaced {len(new)} programs, {swapped} attachments")
        return f"{len(new)} programs, {swapped} attachments"
    finally:
        for fd in list(pinned.values()) + list(new.values()):
            os.close(fd)
        bpf.cleanup()


def _same_layout(name, compiled_fd, pinned_fd):
    a = libbpf.obj_info(compiled_fd, libbpf.MapInfo)
    b = libbpf.obj_info(pinned_fd, libbpf.MapInfo)
    fields = ("type", "key_size", "value_size", "max_entries", "map_flags")
    changed = [f"{f} {getattr(b, f)} -> {getattr(a, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if changed:
        raise UpgradeError(f"map {name} changes layout ({', '.join(changed)}): migrating a map's "
                           "entries is not implemented, so the loaded datapath stays as it is")


def _update_link(pin, prog_fd):
    if not os.path.exists(pin):
        return 0
    fd = libbpf.obj_get(pin)
    try:
        libbpf.link_update(fd, prog_fd)
    except OSError as exc:
        if exc.errno == errno.ENOLINK:    # its netns or cgroup is gone: nothing to upgrade
            return 0
        raise
    finally:
        os.close(fd)
    return 1
