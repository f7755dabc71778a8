"""The plan: which mechanism serves each capability of the datapath on this node.

capabilities.choose() makes it from doctor's probes and the verifier's verdicts; load
records it in the node state (as to_json()), and everything after it (enroll, status,
upgrade, metrics, doctor, selfcheck) reads it back with from_json() and asks it
questions through its methods. Nothing outside this module looks into its JSON form.

StrEnums (their str() is their value) and a plain class: the CNI path imports this module.
"""
from enum import StrEnum


class Mechanism(StrEnum):
    """What captures one direction of a pod's traffic."""
    EBPF = "ebpf"         # the cgroup hooks (outbound), sk_lookup (inbound)
    RULES = "rules"       # REDIRECT rules in the pod's netns (rules_backend)


class Ingress(StrEnum):
    """What filters a pod's ingress."""
    BPF = "xdp"           # the BPF filter, on its filter_hooks (recorded as "xdp")
    NFTABLES = "nftables"


class Hook(StrEnum):
    """Where the BPF ingress filter attaches to an interface."""
    TC = "tc"
    XDP = "xdp"


class RulesBackend(StrEnum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"


class RequestedMode(StrEnum):
    """What `load --mode` (and the agent's) asks for; the plan's mode is what it got."""
    AUTO = "auto"           # eBPF for each capability the kernel offers, rules for the rest
    EBPF = "ebpf"           # eBPF for both directions, or fail saying what is missing
    NFTABLES = "nftables"   # rules only, no BPF at all
    IPTABLES = "iptables"


REQUESTED_MODES = tuple(m.value for m in RequestedMode)
# The name a plan gets when its directions differ.
HYBRID = "hybrid"
# Plans recorded before filter_hooks existed had the filter on both hooks.
_OLD_FILTER_HOOKS = (Hook.TC, Hook.XDP)


class Plan:
    """A value: changes make a new one (with_bypass, with_pieces). A plain class with
    slots, not a dataclass: the CNI path imports it, and dataclasses costs ~14 ms."""
    __slots__ = ("mode", "outbound", "inbound", "bypass", "sockmap", "rules_backend", "ingress",
                 "filter_hooks", "refused", "pieces")

    def __init__(self, mode, outbound, inbound, bypass=False, sockmap=False, rules_backend=None,
                 ingress=None, filter_hooks=(), refused=None, pieces=()):
        self.mode = mode                            # "ebpf", "nftables", "iptables" or HYBRID
        self.outbound = Mechanism(outbound)
        self.inbound = Mechanism(inbound)
        self.bypass = bool(bypass)                  # the same-host bypass is on
        self.sockmap = bool(sockmap)                # the bypass can be switched on
        self.rules_backend = RulesBackend(rules_backend) if rules_backend else None
        self.ingress = Ingress(ingress) if ingress else None
        self.filter_hooks = tuple(Hook(h) for h in filter_hooks)   # in order of preference for a veth
        self.refused = dict(refused or {})          # {program: the verifier's reason}
        self.pieces = tuple(pieces)                 # recorded at load (pieces.for_plan)

    def _fields(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        return isinstance(other, Plan) and self._fields() == other._fields()

    def __repr__(self):
        return "Plan(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"

    # --- what the plan means ---------------------------------------------------------
    def mechanism(self, direction):
        """The Mechanism of "outbound" or "inbound"."""
        return {"outbound": self.outbound, "inbound": self.inbound}[direction]

    def rule_directions(self):
        return [d for d in ("outbound", "inbound") if self.mechanism(d) == Mechanism.RULES]

    @property
    def captures_with_bpf(self):
        """Does a direction or the bypass run on the cgroup/sock_ops programs?"""
        return Mechanism.EBPF in (self.outbound, self.inbound) or self.bypass

    @property
    def uses_bpf(self):
        return self.captures_with_bpf or self.ingress == Ingress.BPF

    @property
    def bpf_filter_hooks(self):
        """The hooks the BPF ingress filter may use (none without it)."""
        return list(self.filter_hooks) if self.ingress == Ingress.BPF else []

    def filter_text(self):
        """The ingress filter in a word: its BPF hooks ("tc/xdp", "tc"), else "nftables",
        else "off" (status, load's log, selfcheck, the kernel matrix)."""
        hooks = self.bpf_filter_hooks
        return "/".join(h.value for h in hooks) if hooks else (self.ingress.value if self.ingress else "off")

    def fallbacks(self):
        """One line per program the kernel refused: which program, the verifier's reason,
        and what serves its capability instead (doctor, status, the agent, selfcheck)."""
        from interceptor.datapath.programs import BY_NAME, FILTER_HOOK_OF, Serves
        out = []
        for name, reason in sorted(self.refused.items()):
            serves = BY_NAME[name].serves if name in BY_NAME else None
            if name in FILTER_HOOK_OF:
                hooks = self.bpf_filter_hooks
                instead = f"ingress filter on {' and '.join(h.value for h in hooks)}" if hooks else \
                    f"ingress filter on {self.ingress.value if self.ingress else 'nothing: pods are not filtered'}"
            elif serves == Serves.BYPASS:
                instead = "no same-host bypass"
            elif serves in (Serves.OUTBOUND, Serves.INBOUND):
                backend = self.rules_backend.value if self.rules_backend else self.mechanism(serves.value).value
                instead = f"{serves.value} capture on {backend} rules"
            else:
                instead = "capture on " + (self.rules_backend.value if self.rules_backend else "rules")
            out.append(f"the kernel refused {name} ({reason}): {instead}")
        return out

    def describe(self):
        """One line: the mode, each direction, the filter."""
        return (f"{self.mode}: outbound {self.outbound.value}, inbound {self.inbound.value}, "
                f"ingress filter {self.filter_text()}")

    # --- changes (a plan is a value: these return a new one) ---------------------------
    def _replace(self, **changes):
        return Plan(**dict({n: getattr(self, n) for n in self.__slots__}, **changes))

    def with_bypass(self, on):
        return self._replace(bypass=on)

    def with_pieces(self, names):
        return self._replace(pieces=names)

    # --- its recorded form (node state, doctor's, status's and selfcheck's JSON) -------
    def to_json(self, pieces=True):
        doc = {"mode": self.mode, "outbound": self.outbound.value, "inbound": self.inbound.value,
               "bypass": self.bypass, "sockmap": self.sockmap,
               "rules_backend": self.rules_backend.value if self.rules_backend else None,
               "ingress": self.ingress.value if self.ingress else None,
               "filter_hooks": [h.value for h in self.filter_hooks], "refused": dict(self.refused)}
        if pieces:
            doc["pieces"] = list(self.pieces)
        return doc

    @classmethod
    def from_json(cls, doc):
        """A recorded plan, of this version or an older one (a plan of before sockmap
        could always switch the bypass on; one of before filter_hooks had both hooks).
        ValueError when it is not a plan (problem() says why, for the node state)."""
        why = problem(doc)
        if why:
            raise ValueError(why)
        bpf_filter = doc.get("ingress") == Ingress.BPF
        return cls(mode=doc["mode"], outbound=doc["outbound"], inbound=doc["inbound"],
                   bypass=doc.get("bypass", False), sockmap=doc.get("sockmap", True),
                   rules_backend=doc.get("rules_backend"), ingress=doc.get("ingress"),
                   filter_hooks=doc.get("filter_hooks", _OLD_FILTER_HOOKS if bpf_filter else ()),
                   refused=doc.get("refused"), pieces=doc.get("pieces") or ())


# The recorded form's fields and their types.
_OPTIONAL = type(None)
_FIELDS = {"mode": str, "outbound": str, "inbound": str, "bypass": bool, "sockmap": bool,
           "ingress": (str, _OPTIONAL), "rules_backend": (str, _OPTIONAL), "pieces": list,
           "filter_hooks": list, "refused": dict}
_ENUMS = {"outbound": Mechanism, "inbound": Mechanism, "ingress": Ingress, "rules_backend": RulesBackend}


def problem(doc):
    """Why a recorded plan cannot be read, or None."""
    from interceptor.store import misfit
    if not isinstance(doc, dict):
        return "plan is not an object"
    missing = [key for key in ("mode", "outbound", "inbound") if key not in doc]
    if missing:
        return f"plan without {', '.join(missing)}"
    wrong = misfit(doc, _FIELDS, "plan.")
    if wrong:
        return wrong
    for key, enum in _ENUMS.items():
        if doc.get(key) is not None and doc[key] not in {m.value for m in enum}:
            return f"plan.{key} is {doc[key]!r}"
    unknown = [h for h in doc.get("filter_hooks") or () if h not in {m.value for m in Hook}]
    return f"plan.filter_hooks has {unknown[0]!r}" if unknown else None


def from_json_or_none(doc):
    """A recorded plan, or None when there is none or it cannot be read."""
    try:
        return Plan.from_json(doc) if doc else None
    except ValueError:
        return None
