"""The node state (node.json): what load and upgrade recorded of the node's datapath
(read once per operation), and whether that load is whole: complete, with every pin
its plan leaves."""
import os

from interceptor import paths
from interceptor.store import misfit, read_json, write_json


def current():
    """The NodeState; None when there is none or it is damaged (read_node says why)."""
    return read_node()[0]


def node_plan():
    """The Plan of the current complete load, or None."""
    node = current()
    return node.plan if node and node.complete else None


def expected_pins(plan=None):
    """Every pin a complete load with this plan leaves (per-pod pins excluded)."""
    from interceptor.datapath.maps import LAYOUT
    from interceptor.datapath.plan import Mechanism, Plan
    from interceptor.datapath.programs import CGROUP, PROGRAMS
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


# The node state's fields and their types, as load and upgrade write them. A file that
# does not fit is damaged: treated as no load (the plugin then fails closed, code 11),
# named by status, and removed by `interceptor unload` with everything else.
_OPTIONAL = type(None)
_NODE_FIELDS = {
    "plan": dict, "complete": bool, "requested_mode": str, "bypass": bool,
    "cgroup": (str, _OPTIONAL), "cgroup_mounted_by_us": bool, "datapath_version": (str, _OPTIONAL),
    "host_netns_cookie": int, "map_sizes": dict, "map_layouts": dict, "upgrading_to": (str, _OPTIONAL),
    "migrating_maps": list, "loaded_at": (int, float), "upgraded_at": (int, float),
    "compile_seconds": (int, float),
}


class NodeState:
    """What load and upgrade recorded of the node's datapath (node.json). Fields of a
    newer or older version this one does not know are kept as they were (extra)."""
    __slots__ = ("requested_mode", "plan", "complete", "cgroup", "datapath_version",
                 "host_netns_cookie", "map_sizes", "map_layouts", "upgrading_to", "migrating_maps",
                 "loaded_at", "upgraded_at", "compile_seconds", "extra")

    def __init__(self, requested_mode="auto", plan=None, complete=False, cgroup=None,
                 datapath_version=None, host_netns_cookie=None, map_sizes=None, map_layouts=None,
                 upgrading_to=None, migrating_maps=(), loaded_at=None, upgraded_at=None,
                 compile_seconds=None, extra=None):
        self.requested_mode = requested_mode        # what load was asked for (auto, ebpf, ...)
        self.plan = plan                            # plan.Plan: what it chose (and the bypass switch)
        self.complete = complete                    # every step of the load was done
        self.cgroup = cgroup                        # where the cgroup hooks are attached
        self.datapath_version = datapath_version    # of the loaded programs
        self.host_netns_cookie = host_netns_cookie  # compiled into every program
        self.map_sizes = dict(map_sizes or {})      # {map: capacity} asked for over abi's defaults
        self.map_layouts = dict(map_layouts or {})  # {map: layout} of the pinned maps (migrate.py)
        self.upgrading_to = upgrading_to            # an upgrade's swap began and did not end
        self.migrating_maps = list(migrating_maps)  # ... with these maps staged beside the old
        self.loaded_at, self.upgraded_at = loaded_at, upgraded_at
        self.compile_seconds = compile_seconds
        self.extra = dict(extra or {})

    @property
    def bypass(self):
        """The same-host bypass is switched on (the plan's switch: one fact)."""
        return bool(self.plan and self.plan.bypass)

    def to_json(self):
        doc = dict(self.extra)
        doc["bypass"] = self.bypass        # also at the top, where earlier versions read it
        for name in self.__slots__[:-1]:
            value = getattr(self, name)
            if name == "plan":
                value = value.to_json() if value else None
            if value is not None and not (name in ("upgrading_to", "migrating_maps") and not value):
                doc[name] = value
        doc.setdefault("cgroup", None)
        return doc

    @classmethod
    def from_json(cls, doc):
        """ValueError saying why when the document is not a node state."""
        from interceptor.datapath.plan import Plan
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        problem = misfit(doc, _NODE_FIELDS, "") or \
            (_plan_problem(doc["plan"]) if isinstance(doc.get("plan"), dict) else None) or \
            (None if not doc.get("complete") or isinstance(doc.get("plan"), dict) else "a complete load without a plan")
        if problem:
            raise ValueError(problem)
        known = {k: v for k, v in doc.items() if k in cls.__slots__ and k != "extra"}
        # "bypass" at the top repeats the plan's (written for earlier versions' readers)
        if known.get("plan") is not None:
            known["plan"] = Plan.from_json(known["plan"])
        return cls(**known, extra={k: v for k, v in doc.items() if k not in cls.__slots__ + ("bypass",)})

    def write(self):
        write_json(paths.NODE_STATE, self.to_json())


def _plan_problem(doc):
    from interceptor.datapath.plan import problem
    return problem(doc) or (None if "bypass" in doc else "plan without bypass")


def read_node():
    """(NodeState, problem). None and None when nothing is loaded; None and why when the
    file cannot be used (unreadable, not JSON, fields of the wrong type)."""
    try:
        doc = read_json(paths.NODE_STATE)
    except OSError as exc:
        return None, f"node state {paths.NODE_STATE} is unreadable ({exc.strerror})"
    except ValueError as exc:
        return None, f"node state {paths.NODE_STATE} is not JSON ({str(exc)[:80]})"
    if doc is None:
        return None, None
    try:
        return NodeState.from_json(doc), None
    except ValueError as exc:
        return None, f"node state {paths.NODE_STATE} is damaged ({exc}): `interceptor unload` removes it " \
                     "with everything it described"
