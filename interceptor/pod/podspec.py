"""A pod's interception settings: one table of fields, parsed once at the edge.

Every setting is a row of FIELDS: its name, default, parser, CNI config key, pod
annotation (if a pod may override it) and help text. The `enroll` options (cli.py), the
plugin's config keys and the annotation overrides (cni/config.py) are derived from the
table; Istio keeps its annotations in one registry the same way. PodSettings holds the
parsed, typed values: a PodSettings is valid from construction, so nothing downstream
validates or parses again. Standard library only: the CNI plugin builds one on every ADD.
"""
import ipaddress

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


def _ids(values):
    """One uid/gid or several (Istio's -u/-g take a comma-separated list): a tuple in
    the order given, the first one first (istio-iptables gives it a role of its own)."""
    if isinstance(values, bool):
        raise ValueError(f"{values!r} is not a uid/gid")
    items = [values] if isinstance(values, int) else parsing.words(values)
    out = []
    for item in items:
        number = _id(item)
        if number not in out:
            out.append(number)
    if not out:
        raise ValueError("at least one uid/gid is needed")
    return tuple(out)


def _owner_filter(values):
    """'*' (everyone: no filter) or a list of numeric uids/gids. Names are refused: they
    resolve in the container's image, which the node cannot read."""
    if values == "*" or (isinstance(values, (list, tuple)) and list(values) == ["*"]):
        return None
    items = parsing.words(values) if not isinstance(values, int) else [values]
    out = []
    for item in items:
        if isinstance(item, str) and not item.isdigit():
            raise ValueError(f"{item!r}: give the number (names resolve inside the "
                             "container image, which the node cannot read)")
        number = _id(item)
        if number not in out:
            out.append(number)
    return tuple(out)


def _interfaces(values):
    names = parsing.words(values)
    for name in names:
        if len(name) > 15 or "/" in name or not name.isprintable() or " " in name:
            raise ValueError(f"{name!r} is not an interface name")
    return tuple(dict.fromkeys(names))


def _mark(value):
    """MARK or MARK/MASK (hex or decimal), as Istio's ambient mode writes 0x539/0xfff;
    '' = none."""
    if value in ("", None):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not MARK[/MASK]")
    mark, _, mask = value.partition("/")
    try:
        mark_n, mask_n = int(mark, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        raise ValueError(f"{value!r} is not MARK[/MASK]") from None
    if not (0 <= mark_n < 2**32 and 0 < mask_n < 2**32) or mark_n & ~mask_n:
        raise ValueError(f"{value!r}: MARK and MASK are 32-bit, MARK within MASK")
    return (mark_n, mask_n)


def _dns_servers(values):
    """'*' (every nameserver: what istio-cni does, where the pod's resolv.conf is not
    known) or a list of addresses."""
    if values == "*" or (isinstance(values, (list, tuple)) and list(values) == ["*"]):
        return None
    out = []
    for item in parsing.words(values):
        try:
            out.append(ipaddress.ip_address(item))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    return tuple(sorted(set(out), key=lambda a: (a.version, a)))


def _loopback_cidr(value):
    try:
        net = ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a CIDR") from None
    if net.version != 4 or not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")):
        raise ValueError(f"{value!r} is not an IPv4 loopback range")
    return net


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
LOOPBACK_ONE = ipaddress.ip_network("127.0.0.1/32")
FIELDS = (
    Field("proxy_uid", abi.PROXY_UID, _ids, "proxyUID",
          help="The proxy's uid, or several (comma-separated): their connections are never "
               "redirected (over lo, the first one's go to the inbound port, as Istio's)."),
    Field("proxy_gid", abi.PROXY_GID, _ids, "proxyGID",
          help="The proxy's gid, or several: as proxy-uid."),
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
    Field("interception_mode", "REDIRECT", _choice("REDIRECT", "TPROXY", "NONE"),
          "interceptionMode", "sidecar.istio.io/interceptionMode",
          help="NONE: leave the pod alone. TPROXY: as REDIRECT here (inbound keeps the "
               "source and destination in every mode that steers it with eBPF)."),
    Field("owner_users_include", "*", _owner_filter, "outboundOwnerUsers",
          "interceptor.io/outbound-owner-users",
          help="Capture only the connections of these uids ('*' = every uid)."),
    Field("owner_users_exclude", "", _owner_filter, "outboundOwnerUsersExclude",
          "interceptor.io/outbound-owner-users-exclude",
          help="Never capture the connections of these uids."),
    Field("owner_groups_include", "*", _owner_filter, "outboundOwnerGroups",
          "interceptor.io/outbound-owner-groups",
          help="Capture only the connections of these gids ('*' = every gid; Istio's "
               "ISTIO_OUTBOUND_OWNER_GROUPS)."),
    Field("owner_groups_exclude", "", _owner_filter, "outboundOwnerGroupsExclude",
          "interceptor.io/outbound-owner-groups-exclude",
          help="Never capture the connections of these gids (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)."),
    Field("redirect_dns", False, _bool, "redirectDNS", "interceptor.io/redirect-dns",
          help=f"Send DNS (UDP and TCP port {abi.DNS_SERVER_PORT}) to the DNS proxy on "
               f"{abi.DNS_PORT}, the proxy's own queries excepted (ISTIO_META_DNS_CAPTURE)."),
    Field("dns_servers", "*", _dns_servers, "dnsServers", "interceptor.io/dns-servers",
          help="With redirect-dns: the nameservers whose queries are captured ('*' = "
               "every destination, as istio-cni; '' = none)."),
    Field("exclude_interfaces", "", _interfaces, "excludeInterfaces",
          ISTIO + "excludeInterfaces",
          help="Interfaces whose traffic is never captured, either way."),
    Field("reroute_interfaces", "", _interfaces, "rerouteInterfaces",
          "istio.io/reroute-virtual-interfaces",
          help="Virtual interfaces (KubeVirt): what arrives on them is outbound traffic "
               "of the pod, sent to the outbound port; it is forwarded, not sent from a "
               "socket, so it is captured by rules in the pod in every mode."),
    Field("host_loopback_cidr", "127.0.0.1/32", _loopback_cidr, "hostLoopbackCIDR",
          help="Loopback destinations never captured (Istio's HostIPv4LoopbackCidr)."),
    Field("skip_mark", "", _mark, "skipMark", "interceptor.io/skip-mark",
          help="MARK[/MASK]: sockets carrying it (SO_MARK) are never redirected, as "
               "Istio's ambient ztunnel marks its own (0x539/0xfff)."),
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
        if abi.DNS_PORT in (self.outbound_port, self.inbound_port):
            raise SettingError(BY_NAME["outbound_port"], f"{abi.DNS_PORT} is the DNS proxy's port")

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
            if name in ("proxy_uid", "proxy_gid"):     # one id as a number, as older builds wrote
                out[name] = value[0] if len(value) == 1 else list(value)
                continue
            if name == "skip_mark":
                out[name] = f"{value[0]:#x}/{value[1]:#x}" if value else ""
                continue
            if value is None:                          # the '*' of an owner filter, dns_servers
                out[name] = "*"
                continue
            if name in ("host_loopback_cidr",):
                out[name] = str(value)
                continue
            if name == "dns_servers":
                out[name] = [str(a) for a in value]
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
        if len(self.proxy_uid) > 1 or len(self.proxy_gid) > 1:
            flags |= abi.POD_F_MORE_PROXY_IDS
        for value, flag in ((self.owner_users_include, abi.POD_F_USERS_INCLUDE),
                            (self.owner_groups_include, abi.POD_F_GROUPS_INCLUDE)):
            if value is not None:
                flags |= flag
        for value, flag in ((self.owner_users_exclude, abi.POD_F_USERS_EXCLUDE),
                            (self.owner_groups_exclude, abi.POD_F_GROUPS_EXCLUDE)):
            if value:
                flags |= flag
        if self.captures_dns:
            flags |= abi.POD_F_DNS | (abi.POD_F_DNS_ALL if self.dns_servers is None else 0)
        if self.loopback_included:
            flags |= abi.POD_F_LOOPBACK_INCLUDED
        if self.exclude_interfaces or self.reroute_interfaces:
            flags |= abi.POD_F_EXCLUDE_IFACES
        if self.host_loopback_cidr != LOOPBACK_ONE:
            flags |= abi.POD_F_HOST_LOOPBACK
        return flags

    @property
    def captures_dns(self):
        """DNS capture with a nameserver to capture (as istio-iptables: with none, its
        DNS rules and their exceptions are left out altogether)."""
        return self.redirect_dns and (self.dns_servers is None or len(self.dns_servers) > 0)

    @property
    def loopback_included(self):
        """A loopback range is captured explicitly (Istio's HasLoopBackIP): the app's
        connections over lo are not all left alone then."""
        return any(n.network_address.is_loopback for n in self.include_outbound_cidrs)

    def owner_entries(self):
        """[(abi.OwnerKind, id)] of owner_rules: the proxy's ids beyond the first (the
        first are in pod_config), and the owner filters."""
        out = []
        if len(self.proxy_uid) > 1 or len(self.proxy_gid) > 1:
            out += [(abi.OwnerKind.PROXY_UID, i) for i in self.proxy_uid]
            out += [(abi.OwnerKind.PROXY_GID, i) for i in self.proxy_gid]
        for kind, ids in ((abi.OwnerKind.USER_INCLUDE, self.owner_users_include),
                          (abi.OwnerKind.USER_EXCLUDE, self.owner_users_exclude),
                          (abi.OwnerKind.GROUP_INCLUDE, self.owner_groups_include),
                          (abi.OwnerKind.GROUP_EXCLUDE, self.owner_groups_exclude)):
            out += [(kind, i) for i in ids or ()]
        return out
