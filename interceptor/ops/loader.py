"""The node loader: decide the mode, compile the datapath once, pin it, attach the
node-wide hooks.

This is the only module that imports BCC. Everything it creates is pinned under
paths.PIN_ROOT so that other processes (enroll, the CNI plugin, status) reach it through
libbpf, and so that unload can remove exactly what load made. Which capabilities run on
eBPF and which on rules (the plan) is decided here, once, from doctor's probes, and
recorded in the node state for everyone else.
"""
import ctypes
import os
import shutil
import time

from interceptor import abi, paths, store
from interceptor.kernel import libbpf, mounts, netns
from interceptor.datapath.maps import LAYOUT, Maps
from interceptor.datapath.node_state import NodeState, read_node
from interceptor.datapath.node_state import node_plan as recorded_plan
from interceptor.datapath.plan import Mechanism, Plan
from interceptor.datapath.programs import (BYPASS_MAP, CGROUP, POD_COPY, PROGRAMS, SOCKHASH, TAIL,
                                           TAIL_MAPS)
from interceptor.pod import podrecord
from interceptor import pieces
from interceptor.ops.capabilities import choose, probes_for


class LoadError(Exception):
    pass


def node_state():
    """The NodeState; None when there is none or it is damaged (read_node)."""
    return read_node()[0]


def node_plan():
    """The plan of the current load, or None when nothing is loaded."""
    return recorded_plan()


def expected_pins(plan=None):
    """Every pin a complete load with this plan leaves (per-pod pins excluded)."""
    plan = plan or node_plan()
    if plan is None:
        plan = Plan(mode="ebpf", outbound=Mechanism.EBPF, inbound=Mechanism.EBPF, bypass=True, sockmap=True)
    if not plan.uses_bpf:
        return []
    pins = [paths.map_pin(name) for name in LAYOUT]
    pins += [paths.prog_pin(p.name) for p in PROGRAMS if p.loaded(plan)]
    pins += [paths.link_pin(p.name) for p in PROGRAMS if p.scope == CGROUP and p.needed(plan)]
    return pins


def missing_pins(plan):
    return [p for p in expected_pins(plan) if not os.path.exists(p)]


def loaded_plan(node=None):
    """The Plan of a complete load whose pins are all there, else None. node: the
    NodeState the caller has read already (else it is read here)."""
    plan = node_plan() if node is None else (node.plan if node.complete else None)
    return plan if plan is not None and not missing_pins(plan) else None


def is_loaded():
    return loaded_plan() is not None


def load(cgroup=None, bypass=False, mode="auto", map_sizes=None, log=lambda msg: None):
    """Idempotent: a complete earlier load is kept (only the bypass switch is applied);
    leftovers of an interrupted one are removed first. map_sizes: {map: capacity} over
    abi.py's defaults (map_sizes.py). Returns a short summary."""
    from interceptor.ops import doctor
    with store.node_lock():
        if is_loaded():
            node = node_state()
            if mode != node.requested_mode:
                raise LoadError(f"already loaded with --mode {node.requested_mode}; "
                                "unload first to change the mode")
            if cgroup and node.cgroup and os.path.realpath(cgroup) != os.path.realpath(node.cgroup):
                raise LoadError(f"already loaded at cgroup {node.cgroup}; "
                                "unload first to attach elsewhere")
            if map_sizes is not None and map_sizes != node.map_sizes:
                raise LoadError("already loaded with other map sizes: `interceptor upgrade "
                                "--map-size` resizes them in place, keeping every pod")
            return "bypass switched" if _apply_bypass(bypass) else "already loaded"
        if _repaired_in_place(mode, map_sizes, log):
            return "repaired"
        if os.path.exists(paths.PIN_ROOT) or os.path.exists(paths.NODE_STATE):
            log("removing leftovers of an incomplete load")
            _teardown()
        report = doctor.run(only=probes_for(mode))
        build = None
        try:
            plan = choose(mode, report)
            if plan.uses_bpf:
                # the kernel judges the programs that will run: compiled once, each
                # loaded; what it refuses goes to the next mechanism down (build.py)
                build = _build(map_sizes or {}, log)
                plan = choose(mode, report, build.refused)
        except ValueError as exc:
            if build is not None:
                build.close()
            raise LoadError(str(exc)) from None
        plan = plan.with_bypass(plan.bypass and bypass)
        plan = plan.with_pieces(pieces.for_plan(plan))
        log(f"mode {plan.mode}: outbound {plan.outbound}, inbound {plan.inbound}, "
            f"bypass {'on' if plan.bypass else 'off'}, ingress filter {plan.filter_text()}")
        for line in plan.fallbacks():
            log(line)
        try:
            _load(plan, mode, cgroup, map_sizes or {}, build, log)
        except BaseException:
            _teardown()
            raise
        finally:
            if build is not None:
                build.close()
        return "loaded"


def _build(map_sizes, log):
    from interceptor.datapath.build import Build, BuildError
    try:
        build = Build(netns.host_cookie(), map_sizes)       # compiled into every program
    except BuildError as exc:
        raise LoadError(str(exc)) from None
    log(f"compiled datapath in {build.compile_seconds:.2f}s")
    return build.load()


def _repaired_in_place(mode, map_sizes, log):
    """A load that was complete and lost a program or link keeps its maps and pods: the
    programs are loaded again into it (upgrade.repair). Tearing it down instead would
    uncapture every pod until it is enrolled again."""
    from interceptor.ops.upgrade import UpgradeError, repair
    node = node_state()
    if node is None or not node.complete or node.requested_mode != mode or \
            (map_sizes is not None and map_sizes != node.map_sizes):
        return False
    try:
        log(repair(node, log))
    except (UpgradeError, OSError) as exc:
        log(f"cannot repair the loaded datapath in place ({exc}): loading afresh")
        return False
    return is_loaded()


def _load(plan, mode, cgroup, map_sizes, build, log):
    from interceptor.datapath.bpf_source import datapath_version
    from interceptor.datapath.migrate import layouts
    node = NodeState(requested_mode=mode, plan=plan, datapath_version=datapath_version(map_sizes),
                           map_sizes=map_sizes, map_layouts=layouts())
    node.write()     # first, so a failure can be undone
    if plan.uses_bpf:
        mounts.ensure_bpffs()
        if cgroup:
            if not os.path.isdir(cgroup):
                raise LoadError(f"--cgroup {cgroup}: no such directory")
            node.cgroup = cgroup
        elif plan.captures_with_bpf:
            node.cgroup, _ = mounts.ensure_cgroup2()
        node.write()
        _load_bpf(plan, node.cgroup, build)
        node.host_netns_cookie = build.host_netns_cookie
        node.compile_seconds = round(build.compile_seconds, 3)
    node.complete = True
    node.loaded_at = time.time()
    node.write()


def _load_bpf(plan, cg_path, build):
    """Pin the build's maps and the programs the plan uses (the kernel accepted each of
    them when the plan was made), save the per-pod stubs' templates, attach."""
    for d in (paths.PIN_MAPS, paths.PIN_PROGS, paths.PIN_LINKS, paths.PIN_PODS):
        os.makedirs(d, exist_ok=True)
    # the build's own fds are used throughout (its close() releases them): nothing is
    # reopened from its pin here
    map_fds = build.map_fds
    for name, fd in map_fds.items():
        libbpf.obj_pin(fd, paths.map_pin(name))
    for prog in PROGRAMS:
        if prog.scope == POD_COPY and prog.needed(plan):
            save_pod_template(build, prog)
        if not prog.loaded(plan):
            continue
        fd = build.fd(prog.name)
        libbpf.obj_pin(fd, paths.prog_pin(prog.name))
        if prog.scope == TAIL:
            libbpf.map_update(map_fds[TAIL_MAPS[prog.name]], ctypes.c_uint32(0), ctypes.c_uint32(fd))
    libbpf.map_update(map_fds["settings"], ctypes.c_uint32(0),
                      abi.NodeSettings(abi.NODE_F_BYPASS if plan.bypass else 0))

    # Links, not legacy attachments: they coexist with other programs on the same hook
    # (multi-attach) and go away with their pin, which is what makes unload clean.
    if plan.captures_with_bpf:
        cg_fd = os.open(cg_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog in PROGRAMS:
                if prog.scope != CGROUP or not prog.needed(plan):
                    continue
                link = libbpf.link_create(build.fd(prog.name), cg_fd, prog.attach_type)
                try:
                    libbpf.obj_pin(link, paths.link_pin(prog.name))
                finally:
                    os.close(link)
        finally:
            os.close(cg_fd)
    if plan.bypass:
        _attach_sk_msg(True, build.fd(_sk_msg_prog().name), map_fds[BYPASS_MAP])


def save_pod_template(build, prog):
    """Per-pod programs (the filter's stubs) are loaded by enroll from a saved copy of
    the build's instructions, with each map reference recorded by name. (The build has
    loaded this one for trial already: a verifier rejection changed the plan, not every
    pod start.)"""
    from interceptor.datapath import stubs
    stubs.save_template(stubs.BY_PROG[prog.name], build.insns(prog.name),
                        {fd: name for name, fd in build.map_fds.items()})


def _sk_msg_prog():
    return next(p for p in PROGRAMS if p.scope == SOCKHASH)


def _attach_sk_msg(attach, prog_fd=None, map_fd=None):
    """sk_msg attaches to the bypass sockhash itself (legacy attach; it is detached
    explicitly on unload). The fds are opened from the pins unless given."""
    prog = _sk_msg_prog()
    opened = []
    try:
        if prog_fd is None:
            prog_fd = libbpf.obj_get(paths.prog_pin(prog.name))
            opened.append(prog_fd)
        if map_fd is None:
            map_fd = libbpf.obj_get(paths.map_pin(BYPASS_MAP))
            opened.append(map_fd)
        if attach:
            libbpf.prog_attach(prog_fd, map_fd, prog.attach_type)
        else:
            libbpf.prog_detach(prog_fd, map_fd, prog.attach_type)
    finally:
        for fd in opened:
            os.close(fd)


def _apply_bypass(bypass):
    node = node_state()
    plan = node.plan
    if node.bypass == bypass:
        return False
    if bypass and not (plan.uses_bpf and plan.sockmap):
        raise LoadError(f"mode {plan.mode} has no same-host bypass (it needs eBPF and sockmap)")
    with Maps() as maps:
        maps.settings.put(ctypes.c_uint32(0), abi.NodeSettings(abi.NODE_F_BYPASS if bypass else 0))
    _attach_sk_msg(bypass)
    plan = plan.with_bypass(bypass)
    plan = plan.with_pieces(pieces.for_plan(plan))    # new pods' pods entries serve the bypass
    node.plan = plan
    node.write()
    return True


def unload(log=lambda msg: None):
    """Remove every pod enrollment, detach and unpin everything load made. Idempotent."""
    with store.node_lock():
        _teardown(log)


UNLOAD_GRACE_S = 0.2


def _teardown(log=lambda msg: None):
    from interceptor.datapath import stubs
    from interceptor.ops import enrollment
    cookies = set(podrecord.all_records()) | paths.pinned_pod_cookies()
    for cookie in sorted(cookies):
        enrollment.remove_pod(cookie, unloading=True)
        log(f"unenrolled netns cookie {cookie}")
    if cookies and paths.listdir(paths.PIN_LINKS):
        # capture is off for every pod now; a proxy that accepted a redirected connection
        # just before still asks for its original destination (getsockopt answers from
        # the socket's own record): a moment for it before the hooks go
        time.sleep(UNLOAD_GRACE_S)
    for name in paths.listdir(paths.PIN_LINKS):
        libbpf.detach_link_pin(paths.link_pin(name))
    prog = _sk_msg_prog()
    if os.path.exists(paths.prog_pin(prog.name)) and os.path.exists(paths.map_pin(BYPASS_MAP)):
        _attach_sk_msg(False)
    if os.path.exists(paths.PIN_ROOT):
        shutil.rmtree(paths.PIN_ROOT)   # unlinking a bpffs pin drops its reference
    # ours by its path: released whatever the node state says (it may be damaged, or a
    # load killed right after mounting never recorded it)
    mounts.release_own_cgroup2()
    stubs.remove_templates()
    store.remove(paths.NODE_STATE)
    if os.path.isdir(paths.POD_STATE):
        shutil.rmtree(paths.POD_STATE)


