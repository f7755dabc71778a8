"""The node loader: decide the mode, compile the datapath once, pin it, attach the
node-wide hooks; switch the bypass; unload. Whether to load afresh, or to keep, repair
or upgrade what is loaded, is ensure.py's decision: these are its steps.

Everything it creates is pinned under
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
from interceptor.pod import podrecord
from interceptor.datapath import attach
from interceptor.datapath.maps import Maps
from interceptor.datapath.node_state import NodeState
from interceptor.datapath.programs import BYPASS_MAP
from interceptor import pieces
from interceptor.ops.capabilities import choose, probes_for


class LoadError(Exception):
    pass


def load_fresh(mode, cgroup, bypass, map_sizes, log):
    """Load the datapath afresh (ensure.py decided to; the caller holds the node lock):
    leftovers of an interrupted load are removed first, doctor's probes and then the
    kernel's verdicts on the compiled programs choose the plan, and the maps and
    programs are pinned and attached. map_sizes: {map: capacity} over abi.py's
    defaults (map_sizes.py). Anything failing half-way is torn down again."""
    from interceptor.ops import doctor
    if os.path.exists(paths.PIN_ROOT) or os.path.exists(paths.NODE_STATE):
        log("removing leftovers of an incomplete load")
        teardown()
    report = doctor.run(only=probes_for(mode))
    build = None
    try:
        plan = choose(mode, report)
        if plan.uses_bpf:
            # the kernel judges the programs that will run: compiled once, each
            # loaded; what it refuses goes to the next mechanism down (build.py)
            build = _build(map_sizes, log)
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
        _load(plan, mode, cgroup, map_sizes, build, log)
    except BaseException:
        teardown()
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
    """Pin the build's maps, set the node's settings, and put the programs the plan
    uses in place (attach.py; the kernel accepted each of them when the plan was
    made). The build's own fds are used throughout (its close() releases them)."""
    os.makedirs(paths.PIN_MAPS, exist_ok=True)
    for name, fd in build.map_fds.items():
        libbpf.obj_pin(fd, paths.map_pin(name))
    libbpf.map_update(build.map_fds["settings"], ctypes.c_uint32(0),
                      abi.NodeSettings(abi.NODE_F_BYPASS if plan.bypass else 0))
    attach.place(plan, build, build.map_fds, cg_path)
    attach.save_templates(plan, build)


def switch_bypass(node, bypass):
    """The same-host bypass on or off on a loaded node (the caller holds the node lock):
    its flag in the settings map, the sk_msg program on the bypass map, the plan's switch
    and its pieces (new pods' pods entries serve the bypass). False when it already is."""
    plan = node.plan
    if node.bypass == bypass:
        return False
    if bypass and not (plan.uses_bpf and plan.sockmap):
        raise LoadError(f"mode {plan.mode} has no same-host bypass (it needs eBPF and sockmap)")
    with Maps() as maps:
        maps.settings.put(ctypes.c_uint32(0), abi.NodeSettings(abi.NODE_F_BYPASS if bypass else 0))
    attach.set_sk_msg(bypass)
    plan = plan.with_bypass(bypass)
    node.plan = plan.with_pieces(pieces.for_plan(plan))
    node.write()
    return True


def unload(log=lambda msg: None):
    """Remove every pod enrollment, detach and unpin everything load made. Idempotent."""
    with store.node_lock():
        teardown(log)


UNLOAD_GRACE_S = 0.2


def teardown(log=lambda msg: None):
    """unload's work (the caller holds the node lock)."""
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
    prog = attach.sk_msg_program()
    if os.path.exists(paths.prog_pin(prog.name)) and os.path.exists(paths.map_pin(BYPASS_MAP)):
        attach.set_sk_msg(False)
    if os.path.exists(paths.PIN_ROOT):
        shutil.rmtree(paths.PIN_ROOT)   # unlinking a bpffs pin drops its reference
    # ours by its path: released whatever the node state says (it may be damaged, or a
    # load killed right after mounting never recorded it)
    mounts.release_own_cgroup2()
    stubs.remove_templates()
    store.remove(paths.NODE_STATE)
    if os.path.isdir(paths.POD_STATE):
        shutil.rmtree(paths.POD_STATE)


