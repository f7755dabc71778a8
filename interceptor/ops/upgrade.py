"""Upgrading a loaded datapath in place: this version's programs take the place of the
loaded ones inside the existing links, so every enrolled pod stays intercepted and no
established connection breaks (the maps, which hold the pods and the connections'
original destinations, are kept).

1. Compile this version with BCC (its maps are throwaway).
2. Check each pinned map against the compiled one (type, key and value size, capacity,
   flags). An unchanged map is kept; a changed one (another capacity, `--map-size`, or
   a grown structure) is migrated into the compiled map (migrate.py): its entries are
   copied now, under the node lock that every writer in userspace takes. A map that
   cannot be migrated refuses the upgrade with nothing changed.
3. Load every program from BCC's instructions with their map references pointed at the
   maps they will use (insns.py), all of them before anything is swapped: a verifier
   rejection also changes nothing. Migrated maps are pinned beside the old ones.
4. Swap: bpf_link_update on the cgroup links and on each pod's sk_lookup link, the
   ingress filter in the xdp_main and tc_main program arrays (the pods' stubs tail-call
   it), the sk_msg program on the bypass sockhash; re-pin the programs; move the
   migrated maps' pins into place and carry over what the old programs wrote since the
   copy; save the new stub templates (for pods enrolled from now on); record the new
   datapath version. A map the new build adds is pinned as compiled.
"""
import os
import time

from interceptor import paths
from interceptor.kernel import libbpf, libc
from interceptor.datapath import attach
from interceptor.datapath.bpf_source import datapath_version
from interceptor.datapath.maps import LAYOUT
from interceptor.datapath.migrate import MapMigration, MigrationError, layouts
from interceptor.datapath.plan import Hook
from interceptor.datapath.programs import POD_COPY, PROGRAMS


class UpgradeError(Exception):
    pass


def upgrade(node, sizes, version, log=lambda msg: None):
    """Upgrade the loaded datapath (node: its NodeState, complete and whole) to this
    version (version, of these map capacities). ensure.py decided to; the caller holds
    the node lock. Returns a summary; UpgradeError when it cannot be done (nothing
    changed)."""
    theirs = node.datapath_version
    finish_migration(node)
    if version == theirs and not node.upgrading_to:
        return "already this version"
    if not node.plan.uses_bpf:
        _record(node, version, sizes)
        return f"rules only: version {theirs} -> {version}"
    started = time.monotonic()
    summary = _swap(node, node.plan, version, sizes, log)
    _record(node, version, sizes)
    return f"datapath {theirs} -> {version} in place: {summary} ({time.monotonic() - started:.2f}s)"


def repair(node, log=lambda msg: None):
    """A complete load that lost a program or link pin (unpinned by hand or by another
    tool): this version's programs go into the links that are left, the missing links are
    created again, and maps and pods stay. The caller holds the node lock. Returns a
    summary; UpgradeError when it cannot (the caller then loads afresh)."""
    plan = node.plan if node.complete else None
    if plan is None or not plan.uses_bpf or \
            not all(os.path.exists(paths.map_pin(name)) for name in LAYOUT):
        raise UpgradeError("not a complete load with its maps")
    sizes = node.map_sizes
    version = datapath_version(sizes)
    finish_migration(node)
    summary = _swap(node, plan, version, sizes, log)
    _record(node, version, sizes)
    return f"repaired in place: {summary}"


def _record(node, version, sizes):
    node.datapath_version = version
    node.map_sizes = dict(sizes)
    node.map_layouts = layouts()
    node.upgraded_at = time.time()
    node.upgrading_to, node.migrating_maps = None, []
    node.write()


def _staged_pin(name):
    return paths.map_pin(name) + "_migrating"      # bpffs refuses dots


def finish_migration(node):
    """A migrating upgrade killed part-way left new maps pinned beside the old ones.
    Once the swap had begun (journalled), new programs may use them: they take the old
    ones' place and the upgrade is redone over them. Before that, they are unused."""
    for name in LAYOUT:
        staged = _staged_pin(name)
        if not os.path.lexists(staged):
            continue
        if node.upgrading_to and name in node.migrating_maps:
            os.replace(staged, paths.map_pin(name))
        else:
            os.unlink(staged)


def _swap(node, plan, version, sizes, log):
    from interceptor.datapath.build import Build, BuildError
    try:
        build = Build(node.host_netns_cookie, sizes)
    except BuildError as exc:
        raise UpgradeError(f"the new datapath: {exc}") from None
    pinned, new = {}, {}
    try:
        compiled = build.map_fds
        for name in LAYOUT:
            if not os.path.exists(paths.map_pin(name)):
                # a map this build adds (the loaded programs cannot be using it): the
                # compiled one, empty, is pinned as it is
                libbpf.obj_pin(compiled[name], paths.map_pin(name))
            pinned[name] = libbpf.obj_get(paths.map_pin(name))
        migrations = _migrations(node, compiled, pinned)
        # the maps the new programs use: the kept pinned ones and the migrated new ones
        using = dict(pinned, **{m.name: m.new_fd for m in migrations})
        # every program the loaded plan uses, the stubs' too, judged by the kernel before
        # anything is swapped: one it refuses leaves the loaded datapath as it is
        build.load([p for p in PROGRAMS if p.loaded(plan) or (p.scope == POD_COPY and p.needed(plan))], using)
        if build.refused:
            name, reason = sorted(build.refused.items())[0]
            raise UpgradeError(f"this kernel refuses {name} of the new datapath ({reason}); the loaded "
                               "datapath stays as it is, its pods captured")
        new = {name: fd for name, fd in build.programs.items() if fd is not None}
        for m in migrations:
            libbpf.obj_pin(m.new_fd, _staged_pin(m.name))
        # everything verified: swap. Journalled first: killed half-way, the links hold
        # programs of two builds, which status reports and the next upgrade completes.
        node.upgrading_to = version
        node.migrating_maps = [m.name for m in migrations]
        node.write()
        swapped = attach.place(plan, build, pinned, node.cgroup)
        # a program run that began before its swap still writes the old maps: wait it out,
        # or what it counts after catch_up() reads them is lost
        if migrations:
            libc.wait_for_running_bpf_programs()
        for m in migrations:
            os.replace(_staged_pin(m.name), paths.map_pin(m.name))
            m.catch_up()
        attach.save_templates(plan, build)
        swapped += _restub_xdp_pods(plan)
        moved = "".join(f"; migrated {m.describe()}" for m in migrations)
        log(f"replaced {len(new)} programs, {swapped} attachments{moved}")
        return f"{len(new)} programs, {swapped} attachments{moved}"
    finally:
        for fd in pinned.values():
            os.close(fd)
        build.close()


def _restub_xdp_pods(plan):
    """Each pod's XDP stub is loaded from the template of the build that enrolled it, and
    hands its cookie to the filter the way that build's filter reads it: the pods' XDP
    links get this build's stub (bpf_link_update; the tc stub's contract, skb->cb, has
    not changed). Returns how many links were updated."""
    from interceptor.datapath import stubs
    from interceptor.pieces import xdp
    if Hook.XDP not in plan.bpf_filter_hooks:
        return 0
    updated = 0
    for cookie in sorted(paths.pinned_pod_cookies()):
        links = [n for n in paths.listdir(paths.pod_pin_dir(cookie)) if n.startswith(xdp.LINK_PREFIX)]
        if not links:
            continue
        fd = stubs.load_for_pod(stubs.XDP, cookie)
        try:
            for name in links:
                updated += attach.update_link(os.path.join(paths.pod_pin_dir(cookie), name), fd)
        finally:
            os.close(fd)
    return updated


def _migrations(node, compiled, pinned):
    """A MapMigration, its entries copied, for each pinned map unlike the compiled one."""
    from interceptor.datapath.stubs import template_maps
    fields = ("type", "key_size", "value_size", "max_entries", "map_flags")
    held_by_pods = template_maps()
    migrations = []
    for name in LAYOUT:
        a = libbpf.obj_info(compiled[name], libbpf.MapInfo)
        b = libbpf.obj_info(pinned[name], libbpf.MapInfo)
        if all(getattr(a, f) == getattr(b, f) for f in fields):
            continue
        try:
            if name in held_by_pods:
                raise MigrationError(f"map {name} is held by every pod's filter stub: changing it "
                                     "needs `interceptor unload` and `load`")
            m = MapMigration(name, pinned[name], compiled[name], node.map_layouts.get(name))
            m.copy()
        except MigrationError as exc:
            raise UpgradeError(f"{exc}; the loaded datapath stays as it is") from None
        migrations.append(m)
    return migrations
