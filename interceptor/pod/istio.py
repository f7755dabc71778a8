"""Istio's capture options and the pod setting each one is here: the one table.

A row per option of istio-iptables (its flag, its Config field as run_test.go names it,
the annotation or proxy metadata Istio takes it from) with the setting that does the
same here (interceptor/pod/podspec.py, which gives its CNI key and annotation), how a
value converts, and which of our modes serve it. The README's table of Istio options is
this table (tests/test_istio_options.py keeps them equal); the parity test
(tests/test_istio_parity.py) reads Istio's configurations through from_config().
Standard library only.
"""
from interceptor import abi

# Modes: eBPF (the cgroup hooks and sk_lookup), rules (the nftables and iptables
# fallbacks, and the rules half of hybrid). Coverage strings say how.
BOTH = "eBPF, rules"


class Option:
    __slots__ = ("flag", "config", "istio_source", "setting", "convert", "coverage", "note")

    def __init__(self, flag, config, istio_source, setting, convert=None, coverage=BOTH, note=""):
        self.flag, self.config, self.istio_source = flag, config, istio_source
        self.setting, self.convert = setting, convert
        self.coverage, self.note = coverage, note


def _same(value, cfg):
    return value


def _csv(value, cfg):
    return "" if value is None else str(value).strip(",")


def _dns_servers(value, cfg):
    if cfg.get("CaptureAllDNS"):
        return "*"
    return ",".join(list(cfg.get("DNSServersV4") or []) + list(cfg.get("DNSServersV6") or []))


def _tunnel_port(value, cfg):
    if str(value) != str(abi.HBONE_PORT):
        raise ValueError(f"InboundTunnelPort {value}: only {abi.HBONE_PORT} (HBONE) is supported")
    return None


TRAFFIC = "traffic.sidecar.istio.io/"
OPTIONS = (
    Option("-p", "ProxyPort", "ENVOY_PORT", "outbound_port", _same),
    Option("-z", "InboundCapturePort", "INBOUND_CAPTURE_PORT", "inbound_port", _same),
    Option("-e", "InboundTunnelPort", "INBOUND_TUNNEL_PORT", None, _tunnel_port,
           note=f"fixed at {abi.HBONE_PORT}: never steered inbound, and the proxy's own "
                "connections to it are never sent to its inbound port"),
    Option("-u", "ProxyUID", "ISTIO_PROXY_UID", "proxy_uid", _same),
    Option("-g", "ProxyGID", "ISTIO_PROXY_GID", "proxy_gid", _same),
    Option("-m", "InboundInterceptionMode", "sidecar.istio.io/interceptionMode",
           "interception_mode", _same,
           note="TPROXY is served as REDIRECT: steered inbound connections keep their "
                "source and destination under eBPF anyway; NONE leaves the pod alone"),
    Option("-b", "InboundPortsInclude", TRAFFIC + "includeInboundPorts", "include_inbound_ports", _csv),
    Option("-d", "InboundPortsExclude", TRAFFIC + "excludeInboundPorts", "exclude_inbound_ports", _csv),
    Option("-q", "OutboundPortsInclude", TRAFFIC + "includeOutboundPorts", "include_outbound_ports", _csv),
    Option("-o", "OutboundPortsExclude", TRAFFIC + "excludeOutboundPorts", "exclude_outbound_ports", _csv),
    Option("-i", "OutboundIPRangesInclude", TRAFFIC + "includeOutboundIPRanges",
           "include_outbound_cidrs", _csv),
    Option("-x", "OutboundIPRangesExclude", TRAFFIC + "excludeOutboundIPRanges",
           "exclude_outbound_cidrs", _csv),
    Option("-c", "ExcludeInterfaces", TRAFFIC + "excludeInterfaces", "exclude_interfaces", _csv,
           coverage="eBPF (by the interface's routes and ifindex), rules",
           note="under eBPF, outbound by the routes through the interface when the pod "
                "is enrolled (connect() has no route yet), inbound by the arriving "
                "interface"),
    Option("-k", "KubeVirtInterfaces", "istio.io/reroute-virtual-interfaces",
           "reroute_interfaces", _csv, coverage="rules, in every mode",
           note="a VM's traffic is forwarded, never sent from a socket of the pod: no "
                "socket hook sees it, so rules in the pod serve it in every mode"),
    Option("(env)", "RedirectDNS", "ISTIO_META_DNS_CAPTURE", "redirect_dns", _same,
           coverage="eBPF (UDP: sendmsg/recvmsg and connect hooks; TCP: connect), rules",
           note="rules modes add Istio's conntrack zones; eBPF has no NAT to keep apart"),
    Option("(env)", "CaptureAllDNS", "(istio-cni)", "dns_servers", _dns_servers),
    Option("(resolv.conf)", "DNSServersV4", "/etc/resolv.conf", "dns_servers", _dns_servers),
    Option("(resolv.conf)", "DNSServersV6", "/etc/resolv.conf", "dns_servers", _dns_servers),
    Option("(env)", "OwnerUsersInclude", "ISTIO_OUTBOUND_OWNER_USERS (unmerged PR)",
           "owner_users_include", _csv),
    Option("(env)", "OwnerUsersExclude", "ISTIO_OUTBOUND_OWNER_USERS_EXCLUDE (unmerged PR)",
           "owner_users_exclude", _csv),
    Option("(env)", "OwnerGroupsInclude", "ISTIO_OUTBOUND_OWNER_GROUPS", "owner_groups_include", _csv,
           note="numeric gids only: names resolve in the container's image"),
    Option("(env)", "OwnerGroupsExclude", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
           "owner_groups_exclude", _csv),
    Option("(flag)", "HostIPv4LoopbackCidr", "--ipv4-loopback-cidr", "host_loopback_cidr", _same),
    Option("(derived)", "EnableIPv6", "the pod's addresses", None, None,
           note="not a setting: both families of the pod are served"),
    Option("(env)", "DropInvalid", "INVALID_DROP", None, None, coverage="",
           note="not needed: eBPF rewrites no packet, so no out-of-window packet is "
                "un-NATed into a reset; the rules modes do not drop them"),
    Option("(flag)", "TraceLogging", "--iptables-trace-logging", None, None, coverage="",
           note="counters per reason instead (`interceptor status`, metrics)"),
    Option("-t", "InboundTProxyMark", "ISTIO_INBOUND_TPROXY_MARK", None, None, coverage="",
           note="no TPROXY here (see -m)"),
    Option("-r", "InboundTProxyRouteTable", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", None, None,
           coverage="", note="no TPROXY here (see -m)"),
    Option("(annotation)", "status port", "status.sidecar.istio.io/port", "exclude_inbound_ports",
           None, note="added to the excluded inbound ports, as Istio's injector does"),
    Option("(ambient)", "ztunnel's mark", "SO_MARK 0x539/0xfff", "skip_mark", None,
           note="sockets carrying it are never redirected"),
)
BY_CONFIG = {o.config: o for o in OPTIONS}


def from_config(cfg):
    """Our settings (raw values for PodSettings) for one istio-iptables configuration,
    given as run_test.go's Config fields. Options without a setting are checked, not
    ignored: a value they cannot take raises ValueError."""
    raw = {}
    for key, value in cfg.items():
        option = BY_CONFIG.get(key)
        if option is None:
            raise ValueError(f"unknown istio-iptables option {key}")
        if option.convert is None:
            continue
        converted = option.convert(value, cfg)
        if option.setting is not None:
            raw[option.setting] = converted
    if cfg.get("RedirectDNS") and "dns_servers" not in raw:
        raw["dns_servers"] = _dns_servers(None, cfg)
    if not cfg.get("RedirectDNS"):
        raw.pop("dns_servers", None)
    # run_test.go's defaults that differ from ours: nothing captured unless asked
    raw.setdefault("include_inbound_ports", "")
    raw.setdefault("include_outbound_cidrs", "")
    return raw
