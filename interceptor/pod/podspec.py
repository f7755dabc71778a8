"""A pod's interception settings: one table of fields, parsed once at the edge.

Every setting is a row of FIELDS: its name, default, parser, CNI config key, pod
annotation (if a pod may override it) and help text. The `enroll` options (cli.py), the
plugin's config keys and the annotation overrides (cni/config.py) are derived from the
table; Istio keeps its annotations in one registry the same way. PodSettings holds the
parsed, typed values: a PodSettings is valid from construction, so nothing downstream
validates or parses again. Standard library only: the CNI plugin builds one on every ADD.
"""
from interceptor import abi
from interceptor.pod import ingress_policy, parsing

INGRESS_FILTER_MODES = ("auto", "tc", "native", "generic", "off")


class SettingError(ValueError):
    """A value rejected by its field's parser. `field` names the setting, so each front
    end can say where the value came from (flag, config key, annotation)."""

    def __init__(self, field, detail):
        self.field, self.detail = field, detail
        super().__init__(f"{field.name}: {detail}")


def _id(value):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a uid/gid")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a uid/gid") from None
    if not 0 <= number < 2**32:
        raise ValueError(f"{value!r} is not a uid/gid")
    return number


def _inbound_ports(values):
    """'*' (every port) or a port list."""
    if values == "*" or (isinstance(values, (list, tuple)) and list(values) == ["*"]):
        return ["*"]
    return parsing.ports(values)


def _bool(value):
    """true/false, also as the strings an annotation carries."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{value!r} is not 'true' or 'false'")


def _bypass_legs(value):
    """The legs the same-host bypass may short-circuit, as a tuple in a request's order
    (abi.BYPASS_LEGS; () = off): true/false (every leg or none), or a list of legs, as a
    comma-separated string in a flag, a config key or an annotation."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return tuple(abi.BYPASS_LEGS) if _bool(value) else ()
    try:
        names = parsing.words(value)
    except ValueError:
        raise ValueError(f"{value!r} is not 'true', 'false' or a list of legs") from None
    unknown = [n for n in names if n not in abi.BYPASS_LEGS]
    if unknown or not names:
        raise ValueError(f"{value!r}: legs are {', '.join(abi.BYPASS_LEGS)} (or true, false)")
    return tuple(leg for leg in abi.BYPASS_LEGS if leg in names)


def _choice(*allowed):
    def parse(value):
        if value not in allowed:
            listed = "' or '".join(allowed) if len(allowed) == 2 else "', '".join(allowed)
            raise ValueError(f"{value!r} is not {'one of ' if len(allowed) > 2 else ''}'{listed}'")
        return value
    parse.choices = allowed
    return parse


def _policy(values):
    try:
        return ingress_policy.parse_rules(values)
    except ingress_policy.PolicyError as exc:
        raise ValueError(str(exc)) from None


class Field:
    """One setting. default is given as an operator would write it, and parsed like any
    other value; cli_default is how `enroll --help` shows it."""
    __slots__ = ("name", "default", "parse", "config_key", "annotation", "help")

    def __init__(self, name, default, parse, config_key, annotation=None, help=""):
        self.name, self.default, self.parse = name, default, parse
        self.config_key, self.annotation, self.help = config_key, annotation, help

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self):
        return getattr(self.parse, "choices", None)

    def value(self, raw):
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise SettingError(self, str(exc)) from None


ISTIO = "traffic.sidecar.istio.io/"
FIELDS = (
    Field("proxy_uid", abi.PROXY_UID, _id, "proxyUID",
          help="The proxy's uid: its connections are never redirected."),
    Field("proxy_gid", abi.PROXY_GID, _id, "proxyGID",
          help="The proxy's gid: its connections are never redirected."),
    Field("outbound_port", abi.OUTBOUND_PORT, parsing.port, "outboundPort",
          help="The proxy's outbound capture port."),
    Field("inbound_port", abi.INBOUND_PORT, parsing.port, "inboundPort",
          help="The proxy's inbound capture port."),
    Field("include_outbound_cidrs", "*", parsing.cidrs, "includeOutboundCIDRs",
          ISTIO + "includeOutboundIPRanges",
          help="Comma-separated CIDRs to capture ('*' = all, '' = none)."),
    Field("exclude_outbound_cidrs", "", parsing.cidrs, "excludeOutboundCIDRs",
          ISTIO + "excludeOutboundIPRanges", help="Comma-separated CIDRs never captured."),
    Field("include_outbound_ports", "", parsing.ports, "includeOutboundPorts",
          ISTIO + "includeOutboundPorts", help="Ports captured whatever their CIDR."),
    Field("exclude_outbound_ports", "", parsing.ports, "excludeOutboundPorts",
          ISTIO + "excludeOutboundPorts", help="Ports never captured."),
    Field("include_inbound_ports", "*", _inbound_ports, "includeInboundPorts",
          ISTIO + "includeInboundPorts", help="Inbound ports steered to the proxy ('*' = all)."),
    Field("exclude_inbound_ports", "", parsing.ports, "excludeInboundPorts",
          ISTIO + "excludeInboundPorts",
          help="Inbound ports never steered (always: "
               f"{', '.join(map(str, abi.ALWAYS_EXCLUDED_INBOUND_PORTS))} and the proxy's own ports)."),
    Field("no_proxy", "reject", _choice("reject", "passthrough"), "noProxy",
          help="When the proxy is not listening yet."),
    Field("bypass", True, _bypass_legs, "bypass", "interceptor.io/bypass",
          help="Allow the same-host bypass for this pod: true, false, or the legs it may "
               "short-circuit (outbound: app to its sidecar; mesh: sidecar to a sidecar "
               "on this node; inbound: sidecar to app). Takes effect when the node's "
               "bypass is on (`load --bypass`)."),
    Field("ingress_filter", "auto", _choice(*INGRESS_FILTER_MODES), "ingressFilter",
          "interceptor.io/ingress-filter",
          help="Hook of the pod's ingress filter: tc, or XDP native or generic (auto: tc "
               "on veth, where XDP costs bulk throughput and pod start time; XDP native, "
               "else generic, on other drivers; nftables where the node has no BPF filter)."),
    Field("protected_ports", "", parsing.ports, "protectedPorts", "interceptor.io/protected-ports",
          help=f"Ports dropped from the network besides the outbound port and {abi.ADMIN_PORT}."),
    Field("ingress_policy", (), _policy, "ingressPolicy", "interceptor.io/ingress-policy",
          help="'deny|allow [from CIDR] [tcp|udp|sctp|icmp|any] [port N]' (repeatable; "
               "in an annotation, separated by ';')."),
    Field("ingress_conflict", "refuse", _choice("refuse", "skip"), "ingressConflict",
          help="When another XDP program, or another tc filter at the filter's preference, "
               "is on the interface."),
)
BY_NAME = {f.name: f for f in FIELDS}
BY_CONFIG_KEY = {f.config_key: f for f in FIELDS}
BY_ANNOTATION = {f.annotation: f for f in FIELDS if f.annotation}
_DEFAULTS = {f.name: f.value(f.default) for f in FIELDS}


class PodSettings:
    """Typed settings of one pod: ports are ints, port lists sorted ints, CIDR lists
    ip_network objects, the policy parsed rules (interceptor/pod/ingress_policy.py).
    PodSettings(**raw) parses what it is given (raw values, or a record's settings) and
    raises SettingError; the rest are the table's defaults."""
    __slots__ = tuple(BY_NAME)

    def __init__(self, **raw):
        unknown = set(raw) - set(BY_NAME)
        if unknown:
            raise TypeError(f"unknown pod settings: {', '.join(sorted(unknown))}")
        for name, default in _DEFAULTS.items():
            setattr(self, name, BY_NAME[name].value(raw[name]) if name in raw else default)
        if self.outbound_port == self.inbound_port:
            raise SettingError(BY_NAME["inbound_port"], f"{self.inbound_port} must differ from outbound_port")

    def replace(self, **raw):
        """A copy with these fields parsed anew."""
        return PodSettings(**dict(self.to_dict(), **raw))

    def to_dict(self):
        """The JSON form kept in the pod's record; PodSettings(**d) reads it back."""
        out = {}
        for name in BY_NAME:
            value = getattr(self, name)
            if name == "bypass":     # true/false as before legs existed, so older builds read it
                out[name] = list(value) if 0 < len(value) < len(abi.BYPASS_LEGS) else bool(value)
                continue
            out[name] = [str(n) for n in value] if BY_NAME[name].parse is parsing.cidrs else \
                (list(value) if isinstance(value, (list, tuple)) else value)
        return out

    def cidrs(self, name, version):
        """One family's networks of a CIDR-list setting."""
        return [n for n in getattr(self, name) if n.version == version]

    def filter_protected_ports(self):
        """The ports the ingress filter drops from the network: the proxy's capture port,
        its admin port, and the operator's protected ports."""
        return sorted({self.outbound_port, abi.ADMIN_PORT, *self.protected_ports})

    @property
    def steers_all_inbound(self):
        return self.include_inbound_ports == ["*"]

    def flags(self):
        flags = 0
        if self.no_proxy == "passthrough":
            flags |= abi.POD_F_PASSTHROUGH
        if len(self.bypass) == len(abi.BYPASS_LEGS):
            flags |= abi.POD_F_BYPASS
        else:
            for leg in self.bypass:
                flags |= abi.BYPASS_LEGS[leg]
        if self.include_outbound_ports:
            flags |= abi.POD_F_OUT_PORTS_INCLUDE
        if not self.steers_all_inbound:
            flags |= abi.POD_F_IN_PORTS_INCLUDE
        return flags
