"""The fallback path: the datapath's semantics as rules inside a pod's netns.

One abstract rule list per chain, built from the pod's settings in istio-iptables' order
(the eBPF hooks, bpf/sock_connect.c and bpf/sk_lookup.c, decide in the same order),
rendered for nftables (one `inet interceptor` table, replaced and removed atomically) or
iptables (our own INTERCEPTOR_* chains in the nat and raw tables plus one jump rule each,
legacy or nft backend). Each rule carries the datapath's reason label as its comment and
a counter, so status and metrics read the same counters in every mode. Nothing else in
the netns is touched.

The chains, as Istio's (tools/istio-iptables):
  output       the pod's outbound connections (ISTIO_OUTPUT, and DNS over UDP);
  prerouting   inbound connections (ISTIO_INBOUND), and what arrives on the pod's
               virtual interfaces, rerouted to the outbound port (KubeVirt);
  raw_output / raw_prerouting
               with DNS capture, Istio's conntrack zones: the app's queries to the DNS
               proxy and the proxy's own queries upstream are kept apart, so a reply
               is never un-NATed by the wrong entry.

Deliberate differences from Istio's rules, each named in tests/test_istio_parity.py: a
connection of the proxy to its own capture ports is never sent to a capture port (the
eBPF hooks refuse it: a proxy looping to itself), inbound connections to the proxy's
own ports and to 15020/15021/15090 (the status port) are never steered.
"""
import json
import os
import shutil
import subprocess

from interceptor import abi

NFT_TABLE = "interceptor"
IPT_OUT = "INTERCEPTOR_OUTPUT"
IPT_IN = "INTERCEPTOR_PREROUTING"
IPT_RAW_OUT = "INTERCEPTOR_RAW_OUTPUT"
IPT_RAW_IN = "INTERCEPTOR_RAW_PREROUTING"
JUMP_COMMENT = "interceptor"
MULTIPORT_MAX = 15            # iptables multiport takes at most 15 ports per rule

OUTBOUND = "outbound"
INBOUND = "inbound"
REROUTE = "reroute"           # a VM's forwarded traffic (reroute_interfaces), in every mode

LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
INBOUND_SOURCE = {4: abi.INBOUND_SOURCE_V4 + "/32", 6: abi.INBOUND_SOURCE_V6 + "/128"}
ZONE_UPSTREAM, ZONE_APP = 1, 2      # Istio's conntrack zones for DNS over UDP


class RulesError(Exception):
    pass


class Rule:
    """match: family (4, 6 or None), proto ("tcp", "udp" or None: any), oif / iif (an
    interface name), uids / gids (the owner is one of), not_uids / not_gids (none of),
    dports, not_dports, sports, daddrs, saddrs, not_daddr (one address), mark ((mark,
    mask) on the packet); action: "return", a redirect port, or ("zone", n); reason:
    the datapath's counter label."""

    def __init__(self, reason, action, family=None, proto=None, oif=None, iif=None, uids=(),
                 gids=(), not_uids=(), not_gids=(), dports=(), not_dports=(), sports=(),
                 daddrs=(), saddrs=(), not_daddr=None, mark=None):
        self.reason, self.action, self.family, self.proto = reason, action, family, proto
        self.oif, self.iif = oif, iif
        self.uids, self.gids, self.not_uids, self.not_gids = list(uids), list(gids), list(not_uids), list(not_gids)
        self.dports, self.not_dports, self.sports = list(dports), list(not_dports), list(sports)
        self.daddrs, self.saddrs, self.not_daddr = list(daddrs), list(saddrs), not_daddr
        self.mark = mark
        if action not in ("return",) and not isinstance(action, tuple) and proto is None:
            self.proto = "tcp"      # a redirect needs its transport protocol


def _families(addresses):
    return {4: [str(a) for a in addresses if a.version == 4], 6: [str(a) for a in addresses if a.version == 6]}


def _dns_on(s):
    return s.captures_dns


def outbound_rules(s):
    """ISTIO_OUTPUT, in its order. Over lo (to a loopback address or one of the pod's
    own), istio-iptables gives the first proxy uid (else gid) a role of its own: its
    connections go to the inbound port (a self-call), and every other owner's are left
    alone, unless a loopback range is captured explicitly or the port is DNS's."""
    out_port, dns = s.outbound_port, _dns_on(s)
    host_loopback = {4: str(s.host_loopback_cidr), 6: LOOPBACK[6]}
    loopback_included = s.loopback_included
    rules = [Rule("out_skip_excluded_interface", "return", oif=name) for name in s.exclude_interfaces]
    if s.skip_mark:
        rules.append(Rule("out_skip_mark", "return", mark=s.skip_mark))
    if s.exclude_outbound_ports:
        rules.append(Rule("out_skip_excluded_port", "return", proto="tcp", dports=s.exclude_outbound_ports))
        rules.append(Rule("out_skip_excluded_port", "return", proto="udp", dports=s.exclude_outbound_ports))
    for family in (4, 6):
        rules.append(Rule("out_skip_inbound_source", "return", family=family, oif="lo",
                          saddrs=[INBOUND_SOURCE[family]]))
    # the self-call never goes to HBONE's port (nor, deliberately, the proxy's own)
    never = sorted({abi.HBONE_PORT, s.outbound_port, s.inbound_port})
    for kind, ids in (("uid", s.proxy_uid), ("gid", s.proxy_gid)):
        for owner in ids:
            match = {"uids" if kind == "uid" else "gids": [owner]}
            not_match = {"not_uids" if kind == "uid" else "not_gids": [owner]}
            self_never = sorted(set(never) | ({abi.DNS_SERVER_PORT} if dns and kind == "uid" else set()))
            for family in (4, 6):
                rules.append(Rule("out_self_to_inbound", s.inbound_port, family=family, oif="lo",
                                  not_daddr=host_loopback[family], not_dports=self_never, **match))
            if not loopback_included:
                lo = dict(proto="tcp", not_dports=[abi.DNS_SERVER_PORT]) if dns else {}
                for family in (4, 6):
                    rules.append(Rule("out_skip_loopback", "return", family=family, oif="lo",
                                      daddrs=["127.0.0.0/8" if family == 4 else "::1/128"], **lo, **not_match))
                rules.append(Rule("out_skip_local_pod", "return", oif="lo", **lo, **not_match))
            rules.append(Rule("out_skip_proxy_owner", "return", **match))
    if s.owner_users_include is not None:
        rules.append(Rule("out_skip_owner_filter", "return", not_uids=s.owner_users_include))
    for uid in s.owner_users_exclude or ():
        rules.append(Rule("out_skip_owner_filter", "return", uids=[uid]))
    if s.owner_groups_include is not None:
        rules.append(Rule("out_skip_owner_filter", "return", not_gids=s.owner_groups_include))
    for gid in s.owner_groups_exclude or ():
        rules.append(Rule("out_skip_owner_filter", "return", gids=[gid]))
    if dns:
        for proto in ("tcp", "udp"):
            if s.dns_servers is None:
                rules.append(Rule("out_dns_redirected", abi.DNS_PORT, proto=proto, dports=[abi.DNS_SERVER_PORT]))
                continue
            for family, servers in _families(s.dns_servers).items():
                if servers:
                    rules.append(Rule("out_dns_redirected", abi.DNS_PORT, family=family, proto=proto,
                                      dports=[abi.DNS_SERVER_PORT],
                                      daddrs=[f"{a}/{32 if family == 4 else 128}" for a in servers]))
    for family in (4, 6):
        rules.append(Rule("out_skip_loopback", "return", family=family, daddrs=[host_loopback[family]]))
    for version in (4, 6):
        excluded = s.cidrs("exclude_outbound_cidrs", version)
        if excluded:
            rules.append(Rule("out_skip_excluded_cidr", "return", family=version, daddrs=map(str, excluded)))
    if s.include_outbound_ports:
        rules.append(Rule("out_redirected", out_port, dports=s.include_outbound_ports))
    for version in (4, 6):
        included = s.cidrs("include_outbound_cidrs", version)
        if included:
            rules.append(Rule("out_redirected", out_port, family=version, daddrs=map(str, included)))
    rules.append(Rule("out_skip_not_included", "return"))
    return rules


def reroute_rules(s):
    """What arrives on a virtual interface is the outbound traffic of the VM behind it:
    to the outbound port when its destination is captured (Istio's -k), else left
    alone, and never steered inbound."""
    rules = []
    for name in s.reroute_interfaces:
        for version in (4, 6):
            included = s.cidrs("include_outbound_cidrs", version)
            if included:
                rules.append(Rule("out_rerouted", s.outbound_port, family=version, iif=name,
                                  daddrs=map(str, included)))
        rules.append(Rule("in_skip_excluded_interface", "return", iif=name))
    return rules


def inbound_rules(s):
    in_port = s.inbound_port
    never = sorted({s.outbound_port, s.inbound_port, abi.HBONE_PORT, *abi.ALWAYS_EXCLUDED_INBOUND_PORTS})
    rules = [Rule("in_skip_excluded_interface", "return", iif=name) for name in s.exclude_interfaces]
    rules += [
        Rule("in_skip_local", "return", iif="lo"),
        Rule("in_skip_excluded_port", "return", proto="tcp", dports=never),
    ]
    if not s.steers_all_inbound:
        if s.include_inbound_ports:
            rules.append(Rule("in_steered", in_port, dports=s.include_inbound_ports))
        rules.append(Rule("in_skip_excluded_port", "return"))
    else:
        if s.exclude_inbound_ports:
            rules.append(Rule("in_skip_excluded_port", "return", proto="tcp", dports=s.exclude_inbound_ports))
        rules.append(Rule("in_steered", in_port))
    return rules


def dns_zone_rules(s):
    """Istio's conntrack zones for DNS over UDP (raw table): (output rules, prerouting
    rules)."""
    out, pre = [], []
    for uid in s.proxy_uid:
        out.append(Rule("dns_zone", ("zone", ZONE_UPSTREAM), proto="udp", dports=[abi.DNS_SERVER_PORT], uids=[uid]))
        out.append(Rule("dns_zone", ("zone", ZONE_APP), proto="udp", sports=[abi.DNS_PORT], uids=[uid]))
    for gid in s.proxy_gid:
        out.append(Rule("dns_zone", ("zone", ZONE_UPSTREAM), proto="udp", dports=[abi.DNS_SERVER_PORT], gids=[gid]))
        out.append(Rule("dns_zone", ("zone", ZONE_APP), proto="udp", sports=[abi.DNS_PORT], gids=[gid]))
    if s.dns_servers is None:
        out.append(Rule("dns_zone", ("zone", ZONE_APP), proto="udp", dports=[abi.DNS_SERVER_PORT]))
        pre.append(Rule("dns_zone", ("zone", ZONE_UPSTREAM), proto="udp", sports=[abi.DNS_SERVER_PORT]))
    else:
        for family, servers in _families(s.dns_servers).items():
            hosts = [f"{a}/{32 if family == 4 else 128}" for a in servers]
            if hosts:
                out.append(Rule("dns_zone", ("zone", ZONE_APP), family=family, proto="udp",
                                dports=[abi.DNS_SERVER_PORT], daddrs=hosts))
                pre.append(Rule("dns_zone", ("zone", ZONE_UPSTREAM), family=family, proto="udp",
                                sports=[abi.DNS_SERVER_PORT], saddrs=hosts))
    return out, pre


def chains(settings, directions):
    """[(chain, nft hook, nft priority, iptables table, iptables parent, [Rule])] for
    these directions."""
    out = []
    pre = []
    if REROUTE in directions or INBOUND in directions:
        pre += reroute_rules(settings)
    if INBOUND in directions:
        pre += inbound_rules(settings)
    if OUTBOUND in directions:
        out.append(("output", "output", -100, "nat", "OUTPUT", IPT_OUT, outbound_rules(settings)))
    if pre:
        out.append(("prerouting", "prerouting", -100, "nat", "PREROUTING", IPT_IN, pre))
    if OUTBOUND in directions and _dns_on(settings):
        raw_out, raw_pre = dns_zone_rules(settings)
        out.append(("raw_output", "output", -300, "raw", "OUTPUT", IPT_RAW_OUT, raw_out))
        if raw_pre:
            out.append(("raw_prerouting", "prerouting", -300, "raw", "PREROUTING", IPT_RAW_IN, raw_pre))
    return out


# --- nftables ---------------------------------------------------------------------------
def _nft_ports(ports):
    """A port set, with consecutive ports as ranges."""
    return "{ " + ", ".join(_runs(ports, "-")) + " }"


def _runs(ports, sep):
    out, ports = [], sorted(ports)
    i = 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        out.append(str(ports[i]) if i == j else f"{ports[i]}{sep}{ports[j]}")
        i = j + 1
    return out


def _nft_rule(r):
    parts = []
    l4 = r.proto or ("th" if (r.dports or r.not_dports or r.sports) else None)
    if r.proto:
        parts.append(f"meta l4proto {r.proto}")
    elif l4 == "th":
        parts.append("meta l4proto { tcp, udp }")
    if r.oif:
        parts.append(f'oifname "{r.oif}"')
    if r.iif:
        parts.append(f'iifname "{r.iif}"')
    if r.mark:
        parts.append(f"meta mark & {r.mark[1]:#x} == {r.mark[0]:#x}")
    for ids, match in ((r.uids, "skuid"), (r.not_uids, "skuid !="), (r.gids, "skgid"), (r.not_gids, "skgid !=")):
        if ids:
            parts.append(f"meta {match} {{ " + ", ".join(map(str, ids)) + " }")
    ip = "ip" if r.family == 4 else "ip6"
    if r.saddrs:
        parts.append(f"{ip} saddr {{ " + ", ".join(r.saddrs) + " }")
    if r.not_daddr:
        parts.append(f"{ip} daddr != {r.not_daddr}")
    if r.dports:
        parts.append(f"{l4} dport {_nft_ports(r.dports)}")
    if r.not_dports:
        parts.append(f"{l4} dport != {_nft_ports(r.not_dports)}")
    if r.sports:
        parts.append(f"{l4} sport {_nft_ports(r.sports)}")
    if r.daddrs:
        parts.append(f"{ip} daddr {{ " + ", ".join(r.daddrs) + " }")
    parts.append("counter")
    if r.action == "return":
        parts.append("return")
    elif isinstance(r.action, tuple):
        parts.append(f"ct zone set {r.action[1]}")
    else:
        parts.append(f"redirect to :{r.action}")
    parts.append(f'comment "{r.reason}"')
    return " ".join(parts)


def nft_script(settings, directions, replace=True):
    """One transaction: (re)create our table with the pod's rules."""
    lines = []
    if replace:
        # declare-then-delete makes the delete safe when the table does not exist yet
        lines += [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]
    lines.append(f"table inet {NFT_TABLE} {{")
    for name, hook, priority, table, _, _, rules in chains(settings, directions):
        kind = "nat" if table == "nat" else "filter"
        lines.append(f"  chain {name} {{")
        lines.append(f"    type {kind} hook {hook} priority {priority}; policy accept;")
        if table == "nat":
            carried = "{ tcp, udp }" if name == "output" and _dns_on(settings) else "tcp"
            lines.append(f"    meta l4proto != {carried} return")
        lines += ["    " + _nft_rule(r) for r in rules]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- iptables ---------------------------------------------------------------------------
def _ipt_ports(ports):
    return ",".join(_runs(ports, ":"))


def _ipt_rules(r, chain, version):
    if r.family not in (None, version):
        return []
    protos = [r.proto] if r.proto else (["tcp", "udp"] if (r.dports or r.not_dports or r.sports) else [None])
    out = []
    for proto in protos:
        out += _ipt_rules_for(r, chain, proto)
    return out


def _ipt_rules_for(r, chain, proto):
    base = ["-A", chain] + (["-p", proto] if proto else [])
    if r.oif:
        base += ["-o", r.oif]
    if r.iif:
        base += ["-i", r.iif]
    if r.mark:
        base += ["-m", "mark", "--mark", f"{r.mark[0]:#x}/{r.mark[1]:#x}"]
    for uid in r.not_uids:
        base += ["-m", "owner", "!", "--uid-owner", str(uid)]
    for gid in r.not_gids:
        base += ["-m", "owner", "!", "--gid-owner", str(gid)]
    for addr in r.saddrs:           # one source address at most (a list for symmetry)
        base += ["-s", addr]
    if r.not_daddr:
        base += ["!", "-d", r.not_daddr]
    if r.not_dports:
        if len(r.not_dports) > MULTIPORT_MAX:
            raise RulesError(f"{r.reason}: more than {MULTIPORT_MAX} negated ports")
        base += ["-m", "multiport", "!", "--dports", _ipt_ports(r.not_dports)]
    if r.sports:
        base += ["-m", "multiport", "--sports", _ipt_ports(r.sports)]
    if r.action == "return":
        action = ["-j", "RETURN"]
    elif isinstance(r.action, tuple):
        action = ["-j", "CT", "--zone", str(r.action[1])]
    else:
        action = ["-j", "REDIRECT", "--to-ports", str(r.action)]
    tail = ["-m", "comment", "--comment", r.reason] + action
    runs = _runs(r.dports, ":")
    # multiport takes 15 ports, a range counting as two
    port_groups, group, size = [], [], 0
    for run in runs:
        weight = 2 if ":" in run else 1
        if size + weight > MULTIPORT_MAX:
            port_groups.append(group)
            group, size = [], 0
        group.append(run)
        size += weight
    if group:
        port_groups.append(group)
    port_groups = port_groups or [None]
    owners = [("--uid-owner", u) for u in r.uids] + [("--gid-owner", g) for g in r.gids] or [None]
    addrs = r.daddrs or [None]
    out = []
    for owner in owners:
        for ports in port_groups:
            for addr in addrs:
                rule = list(base)
                if owner:
                    rule += ["-m", "owner", owner[0], str(owner[1])]
                if addr:
                    rule += ["-d", addr]
                if ports:
                    rule += ["-m", "multiport", "--dports", ",".join(ports)]
                out.append(" ".join(rule + tail))
    return out


def iptables_restore_input(settings, directions, version):
    by_table = {}
    for _, _, _, table, _, chain, rules in chains(settings, directions):
        by_table.setdefault(table, []).append((chain, rules))
    lines = []
    for table, table_chains in by_table.items():
        lines.append(f"*{table}")
        for chain, _ in table_chains:
            lines.append(f":{chain} - [0:0]")       # declared chains are flushed by the restore
        for chain, rules in table_chains:
            for r in rules:
                lines += _ipt_rules(r, chain, version)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- running them in a pod's namespace --------------------------------------------------
def run_in_netns(netns_path, argv, stdin=None, check=True):
    p = subprocess.run(["nsenter", f"--net={netns_path}", *argv], input=stdin,
                       capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RulesError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def iptables_backends():
    return [b for b in ("nft", "legacy") if shutil.which(f"iptables-{b}-restore")]


def detect_iptables_backend(netns_path):
    """The backend whose tables already hold rules in this netns (so ours land beside
    them: Istio once wrote to the wrong one, istio/istio#49279); else the system's."""
    for backend in iptables_backends():
        saved = run_in_netns(netns_path, [f"iptables-{backend}-save"], check=False).stdout
        if any(line.startswith("-A ") for line in saved.splitlines()):
            return backend
    version = subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout
    return "nft" if "nf_tables" in version else "legacy"


class Backend:
    """apply() returns what remove() needs to know beyond the backend's name (kept in
    the pod's record): what it had to create that was not ours alone."""
    name = None

    def apply(self, netns_path, settings, directions):
        raise NotImplementedError

    def remove(self, netns_path, created=None):
        raise NotImplementedError

    def present(self, netns_path):
        raise NotImplementedError

    def counters(self, netns_path):
        raise NotImplementedError


class Nftables(Backend):
    name = "nftables"

    def apply(self, netns_path, settings, directions):
        run_in_netns(netns_path, ["nft", "-f", "-"], stdin=nft_script(settings, directions))
        return None

    def remove(self, netns_path, created=None):
        run_in_netns(netns_path, ["nft", "-f", "-"],
             stdin=f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")

    def present(self, netns_path):
        return run_in_netns(netns_path, ["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0

    def counters(self, netns_path):
        p = run_in_netns(netns_path, ["nft", "-j", "list", "table", "inet", NFT_TABLE], check=False)
        if p.returncode != 0:
            return {}
        out = {}
        for item in json.loads(p.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    c = out.setdefault(rule["comment"], {"count": 0, "bytes": 0})
                    c["count"] += expr["counter"]["packets"]
                    c["bytes"] += expr["counter"]["bytes"]
        return out


class Iptables(Backend):
    def __init__(self, backend):
        self.backend = backend
        self.name = f"iptables-{backend}"

    def _tool(self, version, suffix=""):
        return f"{'ip6tables' if version == 6 else 'iptables'}-{self.backend}{suffix}"

    ALL_JUMPS = (("nat", "OUTPUT", IPT_OUT), ("nat", "PREROUTING", IPT_IN),
                 ("raw", "OUTPUT", IPT_RAW_OUT), ("raw", "PREROUTING", IPT_RAW_IN))

    def apply(self, netns_path, settings, directions, before=None):
        """before: made_chains() as they were before our first apply, when the caller
        already asked (to journal it)."""
        before = self.made_chains(netns_path) if before is None else before
        wanted = [(table, parent, chain) for _, _, _, table, parent, chain, _ in chains(settings, directions)]
        for version in (4, 6):
            run_in_netns(netns_path, [self._tool(version, "-restore"), "--noflush"],
                 stdin=iptables_restore_input(settings, directions, version))
            # one look at what is there, rather than a command per jump that may exist
            saved = run_in_netns(netns_path, [self._tool(version, "-save")], check=False).stdout.splitlines()
            for table, parent, chain in wanted:
                if self._jump_line(parent, chain) not in saved:
                    self._jump(netns_path, version, table, "-A", parent, chain, check=True)
                if self._jump_line(parent, chain, tcp_only=True) in saved:
                    # an older build's jump took TCP only: the one left takes DNS's UDP too
                    self._jump(netns_path, version, table, "-D", parent, chain, tcp_only=True)
            # a chain these settings no longer use (DNS capture switched off) goes
            for table, parent, chain in self.ALL_JUMPS:
                if (table, parent, chain) not in wanted and any(line.startswith(f":{chain} ") for line in saved):
                    self._remove_chain(netns_path, version, table, parent, chain)
        # iptables-nft creates the nat and raw tables and base chains it needs: remember
        # which were ours, so remove() can take exactly those away again
        return sorted(map(list, self.made_chains(netns_path) - before))

    def made_chains(self, netns_path):
        """{(family, table, chain)} of the nft `ip`/`ip6` `nat` and `raw` tables, with
        chain "" for each table itself (nft backend only; one listing)."""
        if self.backend != "nft":
            return set()
        p = run_in_netns(netns_path, ["nft", "-j", "list", "ruleset"], check=False)
        if p.returncode != 0:
            return set()
        out = set()
        for item in json.loads(p.stdout).get("nftables", []):
            for kind in ("table", "chain"):
                obj = item.get(kind)
                if obj is None:
                    continue
                table = obj["name"] if kind == "table" else obj["table"]
                if obj["family"] in ("ip", "ip6") and table in ("nat", "raw"):
                    out.add((obj["family"], table, "" if kind == "table" else obj["name"]))
        return out

    @staticmethod
    def _jump_line(parent, chain, tcp_only=False):
        """The jump rule as iptables-save prints it."""
        return f"-A {parent}{' -p tcp' if tcp_only else ''} -m comment --comment {JUMP_COMMENT} -j {chain}"

    def _jump(self, netns_path, version, table, op, parent, chain, check=False, tcp_only=False):
        # builds before DNS capture jumped for TCP only (-p tcp): removal knows both
        proto = ["-p", "tcp"] if tcp_only else []
        return run_in_netns(netns_path, [self._tool(version), "-t", table, op, parent, *proto, "-m",
                                 "comment", "--comment", JUMP_COMMENT, "-j", chain], check=check)

    def _remove_chain(self, netns_path, version, table, parent, chain):
        for tcp_only in (False, True):
            while self._jump(netns_path, version, table, "-D", parent, chain, tcp_only=tcp_only).returncode == 0:
                pass
        for op in ("-F", "-X"):
            run_in_netns(netns_path, [self._tool(version), "-t", table, op, chain], check=False)

    def remove(self, netns_path, created=None):
        for version in (4, 6):
            for table, parent, chain in self.ALL_JUMPS:
                self._remove_chain(netns_path, version, table, parent, chain)
        self._drop_created(netns_path, created or [])

    def _drop_created(self, netns_path, created):
        """Base chains and tables that apply() created, if they are empty now (if another
        tool has put rules in them since, they stay)."""
        ours = (IPT_OUT, IPT_IN, IPT_RAW_OUT, IPT_RAW_IN)
        made = sorted(map(made_entry, created))
        for family, table, chain in made:
            if not chain or chain in ours:
                continue
            listed = run_in_netns(netns_path, ["nft", "-j", "list", "chain", family, table, chain], check=False)
            if listed.returncode == 0 and not any("rule" in i for i in
                                                  json.loads(listed.stdout).get("nftables", [])):
                run_in_netns(netns_path, ["nft", "delete", "chain", family, table, chain], check=False)
        for family, table, chain in made:
            if chain:
                continue
            listed = run_in_netns(netns_path, ["nft", "-j", "list", "table", family, table], check=False)
            if listed.returncode == 0 and not any("chain" in i for i in
                                                  json.loads(listed.stdout).get("nftables", [])):
                run_in_netns(netns_path, ["nft", "delete", "table", family, table], check=False)

    def present(self, netns_path):
        saved = run_in_netns(netns_path, [self._tool(4, "-save"), "-t", "nat"], check=False).stdout
        return f"--comment {JUMP_COMMENT} -j " in saved

    def counters(self, netns_path):
        out = {}
        for version in (4, 6):
            saved = run_in_netns(netns_path, [self._tool(version, "-save"), "-c", "-t", "nat"], check=False).stdout
            for line in saved.splitlines():
                if not line.startswith("[") or " -A INTERCEPTOR_" not in line:
                    continue
                counts, _, rest = line.partition("] ")
                packets, _, nbytes = counts[1:].partition(":")
                words = rest.split()
                if "--comment" in words:
                    reason = words[words.index("--comment") + 1].strip('"')
                    c = out.setdefault(reason, {"count": 0, "bytes": 0})
                    c["count"] += int(packets)
                    c["bytes"] += int(nbytes)
        return out


def made_entry(entry):
    """(family, table, chain) of a journalled made_chains() entry; builds before raw
    tables recorded (family, chain), of the nat table."""
    return tuple(entry) if len(entry) == 3 else (entry[0], "nat", entry[1])


def backend_named(name):
    if name == "nftables":
        return Nftables()
    if name and name.startswith("iptables-"):
        return Iptables(name.split("-", 1)[1])
    raise RulesError(f"unknown rules backend {name!r}")


def netns_gone(netns_path):
    return not netns_path or not os.path.exists(netns_path)

