"""Where connections land under Istio's own rules and under ours, probe by probe.

A probe network: the pod (P) with four interfaces, eth0 (its default route), eth1 (to a
"VM" namespace, V, the way KubeVirt attaches a VM to its pod), eth2 and not-istio-nic
(both to the world, W). W and V answer every TCP connection and UDP datagram that reaches
them (an nftables redirect to one catch-all listener each), P listens on every port the
probes use. For each golden case of istio-iptables' suite (tests/golden/istio/, with the
configuration run_test.go gives it), the grid of probes is run once against Istio's rules
(the golden file restored into a fresh P) and once against our datapath in one mode (a
fresh P enrolled with the same configuration, read through interceptor/pod/istio.py), and
the landings are compared.

A landing: which namespace and port accepted the connection (or answered the datagram)
and the original destination a proxy there would see (SO_ORIGINAL_DST, else the
socket's own address), or the error the client got. For UDP, what the app saw: the
answer, and the address it came from.
"""
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid

from interceptor import abi
from interceptor.harness.lab import delete_netns, stop_process

TESTS = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(TESTS, "golden", "istio")
PROBE = os.path.join(TESTS, "parity_probe.py")

# Names in the goldens resolve in istio-init's image; here they are given numbers (in
# the restored rules and in our configuration alike).
NAMES = {"root": 0, "tomcat": 3101, "java": 3102, "ftp": 3103}
# An IPv4-compatible address (deprecated) is not routed: the nameserver of dns-uid-gid
# is given a routable one, in its rules and our configuration alike.
ADDRESSES = {"::127.0.0.53": "fd53::53"}

# run_test.go's constructTestConfig(), then each case's changes (the cases added after
# that file's stored version, and the owner-users ones from their PR branch, read off
# their golden files).
BASE_CONFIG = {"ProxyPort": "15001", "InboundCapturePort": "15006", "InboundTunnelPort": "15008",
               "ProxyUID": "1337", "ProxyGID": "1337", "OwnerGroupsInclude": "*",
               "HostIPv4LoopbackCidr": "127.0.0.1/32"}
CASES = {
    "ipv6-empty-inbound-ports": {"InboundPortsInclude": "", "EnableIPv6": True},
    "ip-range": {"OutboundIPRangesExclude": "1.1.0.0/16", "OutboundIPRangesInclude": "9.9.0.0/16",
                 "RedirectDNS": True, "ProxyGID": "1,2", "ProxyUID": "3,4",
                 "DNSServersV4": ["127.0.0.53"]},
    "tproxy": {"InboundInterceptionMode": "TPROXY", "InboundPortsInclude": "*",
               "OutboundIPRangesExclude": "1.1.0.0/16", "OutboundIPRangesInclude": "9.9.0.0/16",
               "RedirectDNS": True, "DNSServersV4": ["127.0.0.53"],
               "ExcludeInterfaces": "not-istio-nic", "EnableIPv6": True},
    "ipv6-inbound-ports": {"InboundPortsInclude": "4000,5000", "EnableIPv6": True},
    "ipv6-virt-interfaces": {"InboundPortsInclude": "4000,5000", "KubeVirtInterfaces": "eth0,eth1",
                             "EnableIPv6": True},
    "ipv6-ipnets": {"InboundPortsInclude": "4000,5000", "InboundPortsExclude": "6000,7000,",
                    "KubeVirtInterfaces": "eth0,eth1", "OutboundIPRangesExclude": "2001:db8::/32",
                    "OutboundIPRangesInclude": "2001:db8::/32", "EnableIPv6": True},
    "ipv6-uid-gid": {"InboundPortsInclude": "4000,5000", "InboundPortsExclude": "6000,7000",
                     "KubeVirtInterfaces": "eth0,eth1", "ProxyGID": "1,2", "ProxyUID": "3,4",
                     "EnableIPv6": True, "OutboundIPRangesExclude": "2001:db8::/32",
                     "OutboundIPRangesInclude": "2001:db8::/32"},
    "ipv6-outbound-ports": {"InboundPortsInclude": "", "OutboundPortsInclude": "32000,31000",
                            "EnableIPv6": True},
    "empty": {},
    "kube-virt-interfaces": {"KubeVirtInterfaces": "eth1,eth2", "OutboundIPRangesInclude": "*"},
    "ipnets": {"OutboundIPRangesInclude": "10.0.0.0/8"},
    "ipnets-with-kube-virt-interfaces": {"KubeVirtInterfaces": "eth1,eth2",
                                         "OutboundIPRangesInclude": "10.0.0.0/8"},
    "inbound-ports-include": {"InboundPortsInclude": "32000,31000"},
    "inbound-ports-wildcard": {"InboundPortsInclude": "*"},
    "inbound-ports-tproxy": {"InboundPortsInclude": "32000,31000", "InboundInterceptionMode": "TPROXY"},
    "inbound-ports-wildcard-tproxy": {"InboundPortsInclude": "*", "InboundInterceptionMode": "TPROXY"},
    "inbound-wildcard-exclude": {"InboundPortsInclude": "*", "InboundPortsExclude": "22,80,443"},
    "dns-uid-gid": {"RedirectDNS": True, "DNSServersV4": ["127.0.0.53"],
                    "DNSServersV6": ["::127.0.0.53"], "ProxyGID": "1,2", "ProxyUID": "3,4",
                    "EnableIPv6": True},
    "ipv6-dns-uid-gid": {"EnableIPv6": True, "RedirectDNS": True, "ProxyGID": "1,2", "ProxyUID": "3,4"},
    "outbound-owner-groups": {"OwnerGroupsInclude": "java,202"},
    "outbound-owner-groups-exclude": {"OwnerGroupsExclude": "888,ftp"},
    "outbound-owner-users": {"OwnerUsersInclude": "101,tomcat"},
    "outbound-owner-users-exclude": {"OwnerUsersExclude": "999,root"},
    "ipv6-dns-outbound-owner-groups": {"EnableIPv6": True, "RedirectDNS": True,
                                       "OwnerGroupsInclude": "java,202"},
    "ipv6-dns-outbound-owner-groups-exclude": {"EnableIPv6": True, "RedirectDNS": True,
                                               "OwnerGroupsExclude": "888,ftp"},
    "ipv6-dns-outbound-owner-users-outbound-owner-groups": {
        "EnableIPv6": True, "RedirectDNS": True, "OwnerUsersInclude": "101,tomcat",
        "OwnerGroupsInclude": "java,202"},
    "ipv6-dns-outbound-owner-users-exclude-outbound-owner-groups-exclude": {
        "EnableIPv6": True, "RedirectDNS": True, "OwnerUsersExclude": "999,root",
        "OwnerGroupsExclude": "888,ftp"},
    "outbound-ports-include": {"OutboundPortsInclude": "32000,31000"},
    "outbound-ports-exclude": {"OutboundPortsExclude": "22,80,443"},
    "outbound-ports-exclude-single": {"OutboundPortsExclude": "22"},
    "loopback-outbound-iprange": {"OutboundIPRangesInclude": "127.1.2.3/32", "RedirectDNS": True,
                                  "DNSServersV4": ["127.0.0.53"], "ProxyGID": "1,2",
                                  "ProxyUID": "3,4"},
    "basic-exclude-nic": {"ExcludeInterfaces": "not-istio-nic"},
    "logging": {"TraceLogging": True},
    "drop-invalid": {"DropInvalid": True},
    "host-ipv4-loopback-cidr": {"HostIPv4LoopbackCidr": "127.0.0.1/8"},
}


def config(case):
    cfg = dict(BASE_CONFIG, **CASES[case])
    for key in ("DNSServersV4", "DNSServersV6"):
        if key in cfg:
            cfg[key] = [ADDRESSES.get(a, a) for a in cfg[key]]
    for key in ("OwnerUsersInclude", "OwnerUsersExclude", "OwnerGroupsInclude", "OwnerGroupsExclude"):
        if key in cfg and cfg[key] != "*":
            cfg[key] = ",".join(str(NAMES.get(n, n)) for n in cfg[key].split(","))
    return cfg


# --- Istio's rules, from a golden file --------------------------------------------------
def _resolve_names(line):
    for old, new in ADDRESSES.items():
        line = line.replace(f" {old}/", f" {new}/")
    return re.sub(r"(--[ug]id-owner) (\w+)",
                  lambda m: f"{m.group(1)} {NAMES.get(m.group(2), m.group(2))}", line)


def golden_tables(case):
    """{4: {table: [lines]}, 6: {...}} from a golden: restore-style blocks (the IPv4
    tables, then the IPv6 ones: a table seen again starts the IPv6 half) or one command
    per line (the older format)."""
    out = {4: {}, 6: {}}
    family, table = 4, None
    with open(os.path.join(GOLDENS, case + ".golden")) as f:
        lines = [line.rstrip("\n") for line in f]
    for line in lines:
        if not line.strip() or line in ("iptables-save", "ip6tables-save", "COMMIT"):
            continue
        m = re.match(r"(ip6?tables) -t (\w+) (.*)", line)
        if m:
            fam = 6 if m.group(1) == "ip6tables" else 4
            out[fam].setdefault(m.group(2), []).append(_resolve_names(m.group(3)))
            continue
        if line.startswith("* "):
            table = line[2:].strip()
            if table in out[family]:
                family = 6
            out[family][table] = []
            continue
        out[family][table].append(_resolve_names(line))
    return out


def restore_input(rules):
    """iptables-restore input for one family's {table: [rule lines]}."""
    text = []
    for table, lines in rules.items():
        text.append(f"*{table}")
        text += [f":{line.split()[1]} - [0:0]" for line in lines if line.startswith("-N ")]
        text += [line for line in lines if not line.startswith("-N ")]
        text.append("COMMIT")
    return "\n".join(text) + "\n"


# --- the probe network -------------------------------------------------------------------
P_PORTS = (22, 53, 80, 443, 4000, 5000, 6000, 7000, 15000, 15001, 15006, 15008, 15020,
           15021, 15053, 15090, 31000, 32000)
CATCH_ALL = 9
FIRST_SOURCE_PORT = 40000      # probe i of a run binds FIRST_SOURCE_PORT + i

# interface: (P's address, peer's address) per family; the peer namespace
LINKS = {
    "eth0": ("10.99.0.{}", "fd99:0::{}", "W"),
    "eth1": ("10.99.1.{}", "fd99:1::{}", "V"),
    "eth2": ("10.99.2.{}", "fd99:2::{}", "W"),
    "not-istio-nic": ("10.99.3.{}", "fd99:3::{}", "W"),
}
# destinations P routes through an interface other than eth0
ROUTES = {"eth1": ("192.168.1.0/24", "fd01::/64"), "eth2": ("192.168.2.0/24", "fd02::/64"),
          "not-istio-nic": ("192.168.3.0/24", "fd03::/64")}
# destinations W and V route into P (forwarded by P: a VM's traffic)
# (V is a VM's side of eth1; W reaches V's network through P)
FORWARDED = {"V": [("0.0.0.0/0", "eth1"), ("::/0", "eth1")],
             "W": [("10.99.1.0/24", "eth0"), ("fd99:1::/64", "eth0")]}


def own(link, family):
    v4, v6, _ = LINKS[link]
    return str(ipaddress.ip_address((v4 if family == 4 else v6).format(2)))


def peer(link, family):
    v4, v6, _ = LINKS[link]
    return str(ipaddress.ip_address((v4 if family == 4 else v6).format(1)))


def over_lo(host):
    """Does P reach host over lo (a loopback address, or one of its own)?"""
    return ipaddress.ip_address(host).is_loopback or host in {own(link, f) for link in LINKS for f in (4, 6)}


OWNERS = {   # name: (uid, gid, supplementary groups)
    "app": (1000, 1000, ()), "root": (0, 0, ()), "proxy": (1337, 1337, ()),
    "proxy-uid": (1337, 1000, ()), "proxy-gid": (1000, 1337, ()),
    "uid3": (3, 1000, ()), "uid4": (4, 1000, ()), "gid1": (1000, 1, ()), "gid2": (1000, 2, ()),
    "uid101": (101, 1000, ()), "tomcat": (3101, 1000, ()), "uid999": (999, 1000, ()),
    "java": (1000, 3102, ()), "gid202": (1000, 202, ()), "gid888": (1000, 888, ()),
    "ftp": (1000, 3103, ()), "in-java-too": (1000, 1000, (3102,)),
}
OUT_DESTINATIONS = (
    "20.0.0.5", "9.9.0.5", "1.1.0.5", "10.0.0.5", "192.168.1.5", "192.168.2.5", "192.168.3.5",
    "127.0.0.1", "127.1.2.3", "127.0.0.53", own("eth0", 4), own("not-istio-nic", 4),
    "fd00::5", "2001:db8::5", "fd01::5", "fd03::5", "::1", "fd53::53", own("eth0", 6),
)
OUT_PORTS = (22, 53, 80, 443, 31000, 32000, 15001, 15006, 15008, 15020)
IN_PORTS = (22, 80, 4000, 5000, 6000, 7000, 15000, 15001, 15006, 15008, 15020, 15021, 15090,
            31000, 32000)


def probes():
    """[(client namespace, owner, proto, host, port)]: the grid, the same for every
    case."""
    grid = []
    for owner in OWNERS:
        for host in OUT_DESTINATIONS:
            for port in OUT_PORTS:
                grid.append(("P", owner, "tcp", host, port))
            grid.append(("P", owner, "udp", host, 53))
            grid.append(("P", owner, "udpc", host, 53))
    for link, (_, _, ns) in LINKS.items():
        for family in (4, 6):
            for port in IN_PORTS:
                grid.append((ns, "root", "tcp", own(link, family), port))
    for host in ("9.9.0.5", "10.0.0.5", "20.0.0.5", "2001:db8::5", "fd00::5"):
        grid.append(("V", "root", "tcp", host, 80))
    return grid


def _run(argv, check=True, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p


class ProbeNet:
    """P, W and V for one run; close() removes them and ends their listeners."""

    def __init__(self, proxy_uid=abi.PROXY_UID, proxy_gid=abi.PROXY_GID):
        self.proxy = (proxy_uid, proxy_gid)
        tag = uuid.uuid4().hex[:6]
        self.ns = {"P": f"par{tag}-p", "W": f"par{tag}-w", "V": f"par{tag}-v"}
        self.workdir = tempfile.mkdtemp(prefix=f"par{tag}-")
        self.procs = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def path(self, name="P"):
        return f"/run/netns/{self.ns[name]}"

    def ip(self, name, *args):
        return _run(["ip", "-n", self.ns[name], *args])

    def run(self, name, *argv, **kw):
        return _run(["ip", "netns", "exec", self.ns[name], *argv], **kw)

    def _build(self):
        for name in self.ns.values():
            _run(["ip", "netns", "add", name])
        for name in self.ns:
            self.ip(name, "link", "set", "lo", "up")
        for link, (_, _, peer_ns) in LINKS.items():
            peer_if = f"p-{link}"[:15]
            self.ip("P", "link", "add", link, "type", "veth", "peer", "name", peer_if,
                    "netns", self.ns[peer_ns])
            self.ip("P", "addr", "add", own(link, 4) + "/24", "dev", link)
            self.ip("P", "addr", "add", own(link, 6) + "/64", "dev", link, "nodad")
            self.ip(peer_ns, "addr", "add", peer(link, 4) + "/24", "dev", peer_if)
            self.ip(peer_ns, "addr", "add", peer(link, 6) + "/64", "dev", peer_if, "nodad")
            self.ip("P", "link", "set", link, "up")
            self.ip(peer_ns, "link", "set", peer_if, "up")
        self.ip("P", "route", "add", "default", "via", peer("eth0", 4))
        self.ip("P", "-6", "route", "add", "default", "via", peer("eth0", 6))
        for link, (v4, v6) in ROUTES.items():
            self.ip("P", "route", "add", v4, "via", peer(link, 4))
            self.ip("P", "-6", "route", "add", v6, "via", peer(link, 6))
        for ns, routes in FORWARDED.items():
            for net, link in routes:
                family = ipaddress.ip_network(net).version
                via = own(link, family)
                args = ["route", "add", "default" if net in ("0.0.0.0/0", "::/0") else net, "via", via]
                self.ip(ns, *(["-6"] if family == 6 else []), *args)
        self.run("P", "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        for name in ("W", "V"):
            self.run(name, "nft", "-f", "-", input=(
                "table inet catchall {\n chain pre {\n"
                "  type nat hook prerouting priority -100; policy accept;\n"
                f"  meta l4proto {{ tcp, udp }} redirect to :{CATCH_ALL}\n }}\n}}\n"))
        self.logs = {}
        # the DNS proxy answers as the proxy's user, as istio-agent does: Istio's rules
        # put its answers in their own conntrack zone by that owner
        for name, ns, ports, udp, owner in (
                ("P", "P", P_PORTS, 53, ()), ("P-dns", "P", (), abi.DNS_PORT, self.proxy),
                ("W", "W", (CATCH_ALL,), CATCH_ALL, ()), ("V", "V", (CATCH_ALL,), CATCH_ALL, ())):
            log = os.path.join(self.workdir, f"{name}.log")
            argv = [sys.executable, PROBE, "listen", ns, *map(str, ports), "--udp", str(udp), "--out", log]
            if owner:
                argv[2:2] = ["--uid", str(owner[0]), "--gid", str(owner[1])]
            self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.ns[ns], *argv]))
            self.logs[name] = log
        deadline = time.monotonic() + 10
        while not all(os.path.exists(log) and "ready" in open(log).read() for log in self.logs.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("the probe listeners did not start")
            time.sleep(0.02)

    def apply_istio(self, case):
        if config(case).get("InboundInterceptionMode") == "TPROXY":
            # what istio-iptables sets up beside the rules (configureTProxyRoutes): marked
            # packets are delivered locally, to the TPROXY listener
            for family in ("-4", "-6"):
                self.ip("P", family, "rule", "add", "fwmark", "1337", "lookup", "133")
                self.ip("P", family, "route", "add", "local", "default", "dev", "lo", "table", "133")
        tables = golden_tables(case)
        for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            if tables[family]:
                self.run("P", tool, input=restore_input(tables[family]))

    def _new_records(self):
        """Connections accepted since the last call: {(namespace, client address): record}."""
        out = {}
        for name, log in self.logs.items():
            with open(log) as f:
                f.seek(self.offsets.get(name, 0))
                text = f.read()
            complete = text[:text.rfind("\n") + 1]
            self.offsets[name] = self.offsets.get(name, 0) + len(complete.encode())
            for line in complete.splitlines():
                rec = json.loads(line)
                if "peer" in rec:
                    out[(rec["tag"], rec["peer"])] = rec
        return out

    def landings(self):
        """{probe: landing} for the whole grid, one owner's probes at a time (each
        joined with what the listeners logged meanwhile)."""
        grid = probes()
        batches = {}
        for i, (ns, owner, proto, host, port) in enumerate(grid):
            batches.setdefault((ns, owner), []).append(i)
        self.offsets = {}
        self._new_records()
        landed = {}
        for (ns, owner), indexes in batches.items():
            found = self.batch(ns, owner, [grid[i][2:] for i in indexes], [FIRST_SOURCE_PORT + i for i in indexes])
            landed.update(zip((grid[i] for i in indexes), found))
        return landed

    def batch(self, ns, owner, targets, source_ports, mark=None):
        """Landings of [(proto, host, port)] probed at once by owner from namespace ns,
        each from its own source port (a port used again within a run would meet an
        earlier connection's conntrack entry where it is NATed, and be renamed)."""
        if not hasattr(self, "offsets"):
            self.offsets = {}
            self._new_records()
        uid, gid, groups = OWNERS[owner]
        lines = "".join(f"{proto} {host} {port} {source}\n" for (proto, host, port), source in zip(targets, source_ports))
        argv = [sys.executable, PROBE, "--uid", str(uid), "--gid", str(gid), "connect",
                "--groups", ",".join(map(str, groups))] + (["--mark", str(mark)] if mark is not None else [])
        results = json.loads(self.run(ns, *argv, input=lines).stdout)
        # the listeners log each accepted connection shortly after the client saw it
        # connected: wait until every connected probe is accounted for
        wanted = {r["local"] for r in results if "local" in r}
        accepted = {}
        deadline = time.monotonic() + 5
        while True:
            accepted.update(self._new_records())
            if wanted <= {peer for _, peer in accepted} or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        by_peer = {peer: rec for (_, peer), rec in accepted.items()}
        out = []
        for res in results:
            if "local" in res:
                rec = by_peer.get(res["local"])
                out.append((f"{rec['tag']}:{rec['port']}", rec["orig"]) if rec else ("lost",))
            elif "answer" in res:
                out.append((f"{res['answer']['tag']}:{res['answer']['port']}", res["from"]))
            else:
                out.append((res["error"],))
        return out

    def close(self):
        for proc in self.procs:
            stop_process(proc)
        for name in self.ns.values():
            delete_netns(name)
        import shutil
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def istio_landings(case):
    cfg = config(case)
    with ProbeNet(int(cfg["ProxyUID"].split(",")[0]), int(cfg["ProxyGID"].split(",")[0])) as net:
        net.apply_istio(case)
        return net.landings()


if __name__ == "__main__":      # python tests/istio_parity.py CASE: Istio's landings
    t = time.monotonic()
    landed = istio_landings(sys.argv[1])
    for probe, where in sorted(landed.items(), key=str):
        print(probe, where)
    print(f"{len(landed)} probes in {time.monotonic() - t:.1f}s", file=sys.stderr)
