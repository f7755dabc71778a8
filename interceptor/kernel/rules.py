"""The fallback path: the datapath's semantics as REDIRECT rules inside a pod's netns.

One abstract rule list per direction, built from the pod's settings in the same order as
the eBPF hooks decide (bpf/sock_connect.c, bpf/sk_lookup.c), rendered for nftables (one
`inet interceptor` table, replaced and removed atomically) or iptables (our own
INTERCEPTOR_* chains in the nat table plus one jump rule each, legacy or nft backend).
Each rule carries the datapath's reason label as its comment and a counter, so status and
metrics read the same counters in every mode. Nothing else in the netns is touched.

Semantics follow istio-iptables, in its order, including its rule for the proxy's own
connections over lo: to any address but 127.0.0.1 / ::1 (its pod's own, by a self-call
through its outbound cluster) they go to the inbound port, unless they come from the
inbound source (127.0.0.6 / ::6: the proxy's hop to its app) or go to HBONE's port. One
deliberate difference: a connection of the proxy to its own capture ports is never sent
to a capture port (the eBPF hooks refuse it: it is a proxy looping to itself).
"""
import json
import os
import shutil
import subprocess

from interceptor import abi

NFT_TABLE = "interceptor"
IPT_OUT = "INTERCEPTOR_OUTPUT"
IPT_IN = "INTERCEPTOR_PREROUTING"
JUMP_COMMENT = "interceptor"
MULTIPORT_MAX = 15            # iptables multiport takes at most 15 ports per rule

OUTBOUND = "outbound"
INBOUND = "inbound"


class RulesError(Exception):
    pass


class Rule:
    """match: family (4, 6 or None), oif_lo, iif_lo, uid, gid, dports, daddrs, saddrs,
    and the negated not_daddr (one address) and not_dports;
    action: "return" or a redirect port; reason: the datapath's counter label."""

    def __init__(self, reason, action, family=None, oif_lo=False, iif_lo=False, uid=None,
                 gid=None, dports=(), daddrs=(), saddrs=(), not_daddr=None, not_dports=()):
        self.reason, self.action, self.family = reason, action, family
        self.oif_lo, self.iif_lo, self.uid, self.gid = oif_lo, iif_lo, uid, gid
        self.dports, self.daddrs, self.saddrs = list(dports), list(daddrs), list(saddrs)
        self.not_daddr, self.not_dports = not_daddr, list(not_dports)


def outbound_rules(s):
    out_port = s.outbound_port
    # the proxy's own capture ports are left out of the self-call rule (see the docstring)
    self_call_never = sorted({abi.HBONE_PORT, s.outbound_port, s.inbound_port})
    rules = [
        Rule("out_skip_inbound_source", "return", family=4, oif_lo=True,
             saddrs=[abi.INBOUND_SOURCE_V4 + "/32"]),
        Rule("out_skip_inbound_source", "return", family=6, oif_lo=True,
             saddrs=[abi.INBOUND_SOURCE_V6 + "/128"]),
        Rule("out_self_to_inbound", s.inbound_port, family=4, oif_lo=True, uid=s.proxy_uid,
             not_daddr="127.0.0.1/32", not_dports=self_call_never),
        Rule("out_self_to_inbound", s.inbound_port, family=6, oif_lo=True, uid=s.proxy_uid,
             not_daddr="::1/128", not_dports=self_call_never),
        Rule("out_skip_proxy_owner", "return", uid=s.proxy_uid),
        Rule("out_skip_proxy_owner", "return", gid=s.proxy_gid),
        Rule("out_skip_loopback", "return", family=4, daddrs=["127.0.0.0/8"]),
        Rule("out_skip_loopback", "return", family=6, daddrs=["::1/128"]),
        # to the pod's own addresses (routed over lo): never the proxy's business
        Rule("out_skip_local_pod", "return", oif_lo=True),
    ]
    if s.exclude_outbound_ports:
        rules.append(Rule("out_skip_excluded_port", "return", dports=s.exclude_outbound_ports))
    if s.include_outbound_ports:
        rules.append(Rule("out_redirected", out_port, dports=s.include_outbound_ports))
    for version in (4, 6):
        excluded = s.cidrs("exclude_outbound_cidrs", version)
        if excluded:
            rules.append(Rule("out_skip_excluded_cidr", "return", family=version,
                              daddrs=map(str, excluded)))
    for version in (4, 6):
        included = s.cidrs("include_outbound_cidrs", version)
        if included:
            rules.append(Rule("out_redirected", out_port, family=version, daddrs=map(str, included)))
    rules.append(Rule("out_skip_not_included", "return"))
    return rules


def inbound_rules(s):
    in_port = s.inbound_port
    never = sorted({s.outbound_port, s.inbound_port, *abi.ALWAYS_EXCLUDED_INBOUND_PORTS})
    rules = [
        Rule("in_skip_local", "return", iif_lo=True),
        Rule("in_skip_excluded_port", "return", dports=never),
    ]
    if not s.steers_all_inbound:
        rules.append(Rule("in_steered", in_port, dports=s.include_inbound_ports))
        rules.append(Rule("in_skip_excluded_port", "return"))
    else:
        if s.exclude_inbound_ports:
            rules.append(Rule("in_skip_excluded_port", "return", dports=s.exclude_inbound_ports))
        rules.append(Rule("in_steered", in_port))
    return rules


# --- nftables ---------------------------------------------------------------------------
def _nft_rule(r):
    # a redirect port needs a transport protocol match in front of it
    parts = [] if r.dports or r.not_dports or r.action == "return" else ["meta l4proto tcp"]
    if r.oif_lo:
        parts.append('oifname "lo"')
    if r.iif_lo:
        parts.append('iifname "lo"')
    if r.uid is not None:
        parts.append(f"meta skuid {r.uid}")
    if r.gid is not None:
        parts.append(f"meta skgid {r.gid}")
    ip = "ip" if r.family == 4 else "ip6"
    if r.saddrs:
        parts.append(f"{ip} saddr {{ " + ", ".join(r.saddrs) + " }")
    if r.not_daddr:
        parts.append(f"{ip} daddr != {r.not_daddr}")
    if r.dports:
        parts.append("tcp dport { " + ", ".join(map(str, r.dports)) + " }")
    if r.not_dports:
        parts.append("tcp dport != { " + ", ".join(map(str, r.not_dports)) + " }")
    if r.daddrs:
        parts.append(f"{ip} daddr {{ " + ", ".join(r.daddrs) + " }")
    parts.append("counter")
    parts.append("return" if r.action == "return" else f"redirect to :{r.action}")
    parts.append(f'comment "{r.reason}"')
    return " ".join(parts)


def nft_script(settings, directions, replace=True):
    """One transaction: (re)create our table with the pod's rules."""
    lines = []
    if replace:
        # declare-then-delete makes the delete safe when the table does not exist yet
        lines += [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]
    lines.append(f"table inet {NFT_TABLE} {{")
    for direction, hook, builder in ((OUTBOUND, "output", outbound_rules),
                                     (INBOUND, "prerouting", inbound_rules)):
        if direction not in directions:
            continue
        lines.append(f"  chain {hook} {{")
        lines.append(f"    type nat hook {hook} priority -100; policy accept;")
        lines.append("    meta l4proto != tcp return")
        lines += ["    " + _nft_rule(r) for r in builder(settings)]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- iptables ---------------------------------------------------------------------------
def _ipt_rules(r, chain, version):
    if r.family not in (None, version):
        return []
    base = ["-A", chain, "-p", "tcp"]
    if r.oif_lo:
        base += ["-o", "lo"]
    if r.iif_lo:
        base += ["-i", "lo"]
    if r.uid is not None:
        base += ["-m", "owner", "--uid-owner", str(r.uid)]
    if r.gid is not None:
        base += ["-m", "owner", "--gid-owner", str(r.gid)]
    for addr in r.saddrs:           # one source address at most (a list for symmetry)
        base += ["-s", addr]
    if r.not_daddr:
        base += ["!", "-d", r.not_daddr]
    if r.not_dports:
        if len(r.not_dports) > MULTIPORT_MAX:
            raise RulesError(f"{r.reason}: more than {MULTIPORT_MAX} negated ports")
        base += ["-m", "multiport", "!", "--dports", ",".join(map(str, r.not_dports))]
    action = ["-j", "RETURN"] if r.action == "return" else ["-j", "REDIRECT", "--to-ports", str(r.action)]
    tail = ["-m", "comment", "--comment", r.reason] + action
    port_groups = [r.dports[i:i + MULTIPORT_MAX] for i in range(0, len(r.dports), MULTIPORT_MAX)] or [None]
    addrs = r.daddrs or [None]
    out = []
    for ports in port_groups:
        for addr in addrs:
            rule = list(base)
            if addr:
                rule += ["-d", addr]
            if ports:
                rule += ["-m", "multiport", "--dports", ",".join(map(str, ports))]
            out.append(" ".join(rule + tail))
    return out


def iptables_restore_input(settings, directions, version):
    lines = ["*nat"]
    chains = []
    if OUTBOUND in directions:
        chains.append((IPT_OUT, outbound_rules))
    if INBOUND in directions:
        chains.append((IPT_IN, inbound_rules))
    for chain, _ in chains:
        lines.append(f":{chain} - [0:0]")       # declared chains are flushed by the restore
    for chain, builder in chains:
        for r in builder(settings):
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

    def _jumps(self, directions):
        if OUTBOUND in directions:
            yield "OUTPUT", IPT_OUT
        if INBOUND in directions:
            yield "PREROUTING", IPT_IN

    def apply(self, netns_path, settings, directions, before=None):
        """before: nat_chains() as they were before our first apply, when the caller
        already asked (to journal it)."""
        before = self.nat_chains(netns_path) if before is None else before
        for version in (4, 6):
            run_in_netns(netns_path, [self._tool(version, "-restore"), "--noflush"],
                 stdin=iptables_restore_input(settings, directions, version))
            for parent, chain in self._jumps(directions):
                if self._jump(netns_path, version, "-C", parent, chain).returncode != 0:
                    self._jump(netns_path, version, "-A", parent, chain, check=True)
        # iptables-nft creates the nat tables and base chains it needs: remember which
        # were ours, so remove() can take exactly those away again
        return sorted(map(list, self.nat_chains(netns_path) - before))

    def nat_chains(self, netns_path):
        """{(family, chain)} of the nft `ip nat` / `ip6 nat` tables, plus (family, "")
        for each table itself (nft backend only)."""
        if self.backend != "nft":
            return set()
        out = set()
        for family in ("ip", "ip6"):
            p = run_in_netns(netns_path, ["nft", "-j", "list", "table", family, "nat"], check=False)
            if p.returncode != 0:
                continue
            out.add((family, ""))
            out |= {(family, i["chain"]["name"]) for i in json.loads(p.stdout).get("nftables", [])
                    if "chain" in i}
        return out

    def _jump(self, netns_path, version, op, parent, chain, check=False):
        return run_in_netns(netns_path, [self._tool(version), "-t", "nat", op, parent, "-p", "tcp", "-m",
                                 "comment", "--comment", JUMP_COMMENT, "-j", chain], check=check)

    def remove(self, netns_path, created=None):
        for version in (4, 6):
            for parent, chain in self._jumps((OUTBOUND, INBOUND)):
                while self._jump(netns_path, version, "-D", parent, chain).returncode == 0:
                    pass
                for op in ("-F", "-X"):
                    run_in_netns(netns_path, [self._tool(version), "-t", "nat", op, chain], check=False)
        self._drop_created(netns_path, created or [])

    def _drop_created(self, netns_path, created):
        """Base chains and tables that apply() created, if they are empty now (if another
        tool has put rules in them since, they stay)."""
        chains = [(f, c) for f, c in created if c and c not in (IPT_OUT, IPT_IN)]
        for family, chain in chains:
            listed = run_in_netns(netns_path, ["nft", "-j", "list", "chain", family, "nat", chain], check=False)
            if listed.returncode == 0 and not any("rule" in i for i in
                                                  json.loads(listed.stdout).get("nftables", [])):
                run_in_netns(netns_path, ["nft", "delete", "chain", family, "nat", chain], check=False)
        for family, chain in created:
            if chain:
                continue
            listed = run_in_netns(netns_path, ["nft", "-j", "list", "table", family, "nat"], check=False)
            if listed.returncode == 0 and not any("chain" in i for i in
                                                  json.loads(listed.stdout).get("nftables", [])):
                run_in_netns(netns_path, ["nft", "delete", "table", family, "nat"], check=False)

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


def backend_named(name):
    if name == "nftables":
        return Nftables()
    if name and name.startswith("iptables-"):
        return Iptables(name.split("-", 1)[1])
    raise RulesError(f"unknown rules backend {name!r}")


def netns_gone(netns_path):
    return not netns_path or not os.path.exists(netns_path)

