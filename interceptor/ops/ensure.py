"""What to do with the node's datapath, decided in one place for `interceptor load`,
`interceptor upgrade` and the node agent: load it, keep (adopt) what is loaded, repair
it in place, switch its bypass, upgrade it in place, or refuse.

The three differ on purpose, and only in their Request:
  load     loads when nothing is whole; a loaded datapath of another version is kept
           (the operator upgrades it with `upgrade`), other map sizes are refused
  upgrade  needs a loaded datapath; the sizes it names change, the others stay
  agent    loads when nothing is whole; another version or other map sizes (declared:
           the ones it does not name go back to their defaults) are upgraded in place
All three refuse another --mode than the loaded one: changing it uncaptures every pod
until they are enrolled again, which only an operator's unload may do.

`decide` is the table (pure, tested without a kernel); `ensure` reads the node state
once under the node lock, decides, and runs the step (loader.py, upgrade.py).
"""
import os
from enum import StrEnum

from interceptor import store
from interceptor.datapath.bpf_source import datapath_version
from interceptor.datapath.node_state import loaded_plan, read_node
from interceptor.ops import loader, upgrade as upgrading
from interceptor.ops.loader import LoadError
from interceptor.ops.upgrade import UpgradeError

__all__ = ["Action", "Asker", "Decision", "Refused", "Request", "decide", "ensure", "load", "upgrade",
           "LoadError", "UpgradeError"]


class Asker(StrEnum):
    LOAD = "load"
    UPGRADE = "upgrade"
    AGENT = "agent"


class Action(StrEnum):
    LOAD = "load"                       # afresh (leftovers of an incomplete load removed)
    REPAIR = "repair"                   # a complete load that lost pins: programs put back
    KEEP = "keep"                       # whole and as asked (the agent adopts it)
    SWITCH_BYPASS = "switch-bypass"
    UPGRADE = "upgrade"                 # this version's programs into the loaded links
    REFUSE = "refuse"                   # nothing changes; Decision.why says why


class Refused(LoadError):
    """ensure would not do what was asked, and changed nothing."""


class Request:
    """What the asker wants. mode: --mode (None: the loaded one's); map_sizes: {map:
    capacity} (None: not asked); bypass: None to leave it; cgroup: where load attaches."""
    __slots__ = ("asker", "mode", "map_sizes", "bypass", "cgroup")

    def __init__(self, asker, mode=None, map_sizes=None, bypass=None, cgroup=None):
        self.asker, self.mode, self.map_sizes = asker, mode, map_sizes
        self.bypass, self.cgroup = bypass, cgroup

    def sizes_for(self, node):
        """The map capacities the asked-for datapath has: for an upgrade, the loaded
        ones with those named changed; else the ones named (the others at their
        defaults)."""
        if self.asker == Asker.UPGRADE:
            return dict(node.map_sizes if node else {}, **(self.map_sizes or {}))
        return dict(self.map_sizes or {})


class Decision:
    __slots__ = ("action", "why")

    def __init__(self, action, why=""):
        self.action, self.why = action, why

    def __repr__(self):
        return f"Decision({self.action}, {self.why!r})"


def decide(node, whole, request, version):
    """node: the NodeState (None: none, or damaged); whole: it is complete with every
    pin its plan leaves; version: datapath_version of the asked-for map sizes."""
    if not whole:
        if request.asker == Asker.UPGRADE:
            return Decision(Action.REFUSE, "nothing is loaded to upgrade")
        if node is not None and node.complete and node.requested_mode == request.mode and \
                (request.map_sizes is None or request.map_sizes == node.map_sizes):
            return Decision(Action.REPAIR)
        return Decision(Action.LOAD)
    if request.mode is not None and request.mode != node.requested_mode:
        asks = "this agent asks" if request.asker == Asker.AGENT else "this load asks"
        return Decision(Action.REFUSE,
                        f"the datapath is loaded with --mode {node.requested_mode}, {asks} for --mode "
                        f"{request.mode}: changing it needs `interceptor unload` first (it uncaptures "
                        "every pod until they are enrolled again)")
    if request.cgroup and node.cgroup and os.path.realpath(request.cgroup) != os.path.realpath(node.cgroup):
        return Decision(Action.REFUSE, f"already loaded at cgroup {node.cgroup}; unload first to attach elsewhere")
    if request.asker == Asker.LOAD:
        if request.map_sizes is not None and request.map_sizes != node.map_sizes:
            return Decision(Action.REFUSE, "already loaded with other map sizes: `interceptor upgrade "
                                           "--map-size` resizes them in place, keeping every pod")
        if request.bypass is not None and request.bypass != node.bypass:
            return Decision(Action.SWITCH_BYPASS)
        return Decision(Action.KEEP)
    if version == node.datapath_version and not node.upgrading_to:
        return Decision(Action.KEEP)
    return Decision(Action.UPGRADE)     # another version, or an upgrade to finish


class Outcome:
    __slots__ = ("action", "summary", "loaded_version", "version")

    def __init__(self, action, summary, loaded_version=None, version=None):
        self.action, self.summary = action, summary
        self.loaded_version, self.version = loaded_version, version


def ensure(request, log=lambda msg: None):
    """Decide and do it, under the node lock. Returns an Outcome; Refused (nothing
    changed), LoadError (a load failed and was undone) or UpgradeError (an upgrade
    refused, the loaded datapath as it was)."""
    with store.node_lock():
        node = read_node()[0]          # the one read of the node state
        whole = node is not None and loaded_plan(node) is not None
        sizes = request.sizes_for(node)
        version = datapath_version(sizes)
        decision = decide(node, whole, request, version)
        theirs = node.datapath_version if node else None
        if decision.action == Action.REFUSE:
            raise Refused(decision.why)
        if decision.action == Action.REPAIR:
            summary = _repair(node, log)
            if summary is not None:
                return Outcome(Action.REPAIR, "repaired", theirs, version)
            decision = Decision(Action.LOAD)
        if decision.action == Action.LOAD:
            return Outcome(Action.LOAD, loader.load_fresh(request.mode or "auto", request.cgroup,
                                                          bool(request.bypass), sizes, log), None, version)
        if decision.action == Action.SWITCH_BYPASS:
            loader.switch_bypass(node, request.bypass)
            return Outcome(Action.SWITCH_BYPASS, "bypass switched", theirs, theirs)
        if decision.action == Action.UPGRADE:
            try:
                summary = upgrading.upgrade(node, sizes, version, log)
            except UpgradeError as exc:
                raise UpgradeError(f"datapath {theirs} is loaded, this one is {version}: {exc}") from None
            return Outcome(Action.UPGRADE, summary, theirs, version)
        if request.asker != Asker.LOAD:
            upgrading.finish_migration(node)    # staged maps of an upgrade killed before its swap
        return Outcome(Action.KEEP, "already this version" if request.asker == Asker.UPGRADE
                       else "already loaded", theirs, theirs)


def _repair(node, log):
    """A complete load that lost a program or link keeps its maps and pods: the programs
    are put back into it (upgrade.repair). Tearing it down instead would uncapture every
    pod until it is enrolled again. None when it cannot (then it is loaded afresh)."""
    try:
        summary = upgrading.repair(node, log)
    except (UpgradeError, OSError) as exc:
        log(f"cannot repair the loaded datapath in place ({exc}): loading afresh")
        return None
    log(summary)
    return summary if loaded_plan(read_node()[0]) is not None else None


def load(cgroup=None, bypass=False, mode="auto", map_sizes=None, log=lambda msg: None):
    """`interceptor load`: idempotent; a whole load is kept (only the bypass switch is
    applied), a damaged one repaired or loaded again. Returns a short summary."""
    return ensure(Request(Asker.LOAD, mode=mode, map_sizes=map_sizes, bypass=bypass, cgroup=cgroup),
                  log).summary


def upgrade(map_sizes=None, log=lambda msg: None):
    """`interceptor upgrade`: this version's programs in place, the named map sizes
    changed (None: the ones the node has). Returns a summary."""
    return ensure(Request(Asker.UPGRADE, map_sizes=map_sizes), log).summary
