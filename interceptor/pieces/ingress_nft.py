"""The ingress filter where XDP is not available: the same verdicts as
bpf/xdp_ingress.c as an nftables netdev ingress chain on each of the pod's interfaces
(inside the pod's netns), with named counters carrying the datapath's reason labels,
so status and metrics read the same counters. Named counters, not rule counters:
a live policy change replaces the chain's rules in one transaction and must not
reset the counts.

Differences from XDP, stated rather than hidden (tests/test_ingress.py's table lists the
counter each case moves in both): malformed IP headers pass the chain, counted as
ingress_passed, and the stack drops them after it; a truncated TCP header is judged by
the ports it still has; the kernel removes one VLAN tag before the chain runs (the inner
packet is judged), while a second tag makes the frame non-IP to the chain; tiny first
fragments and TCP fragments at offset 8 bytes are not singled out (the kernel's
reassembly discards overlapping fragments).
"""
import json

from interceptor import abi
from interceptor.kernel.rules import run_in_netns
from interceptor.pod import ingress_policy

TABLE = "interceptor_ingress"
LABELS = [name.lower() for name, _ in abi.Reason.items() if name.startswith("INGRESS_")]


def _chain(ifname):
    return f"in_{ifname}"


def _source_matches(rule):
    """nft match prefixes for one rule: one per family it applies to."""
    out = []
    net = rule["from"]
    families = [4, 6] if net is None else [6 if ":" in net else 4]
    for version in families:
        m = []
        if net is not None:
            m.append(f"{'ip' if version == 4 else 'ip6'} saddr {net}")
        else:
            m.append(f"meta protocol {'ip' if version == 4 else 'ip6'}")
        proto = rule["protocol"]
        if proto == "icmp":
            m.append(f"meta l4proto {'icmp' if version == 4 else 'ipv6-icmp'}")
        elif proto != "any":
            m.append(f"meta l4proto {proto}")
        if rule["port"]:
            if proto == "any":
                m.append("meta l4proto { tcp, udp, sctp }")
            m.append(f"th dport {rule['port']}")
        out.append(" ".join(m))
    return out


def chain_rules(protected_ports, rules, ephemeral_low):
    """The rule lines of one interface's chain, in the XDP program's order."""
    c = 'counter name "{}"'.format
    lines = [
        f"meta protocol != {{ ip, ip6 }} {c('ingress_passed_non_ip')} accept",
        f"ip frag-off & 0x1fff != 0 {c('ingress_passed_fragment')} accept",
        f"frag frag-off != 0 {c('ingress_passed_fragment')} accept",
    ]
    if protected_ports:
        ports = ", ".join(str(p) for p in sorted(protected_ports))
        lines.append(f"meta l4proto {{ tcp, udp, sctp }} th dport {{ {ports} }} "
                     f"{c('ingress_dropped_protected_port')} drop")
    for r in rules:
        if r["action"] == "deny":
            lines += [f"{m} {c('ingress_dropped_denied')} drop" for m in _source_matches(r)]
    if ingress_policy.allow_only(rules):
        for r in rules:
            if r["action"] == "allow":
                lines += [f"{m} {c('ingress_passed')} accept" for m in _source_matches(r)]
        lines.append(f"tcp flags & (syn | ack) == syn {c('ingress_dropped_not_allowed')} drop")
        lines.append(f"udp dport < {ephemeral_low} {c('ingress_dropped_not_allowed')} drop")
    lines.append(c("ingress_passed"))
    return lines


def script(ifnames, protected_ports, rules, ephemeral_low):
    out = [f"add table netdev {TABLE}"]
    out += [f"add counter netdev {TABLE} {label}" for label in LABELS]
    body = chain_rules(protected_ports, rules, ephemeral_low)
    for ifname in ifnames:
        chain = _chain(ifname)
        out.append(f"add chain netdev {TABLE} {chain} {{ type filter hook ingress device "
                   f"\"{ifname}\" priority -500 ; policy accept ; }}")
        out.append(f"flush chain netdev {TABLE} {chain}")
        out += [f"add rule netdev {TABLE} {chain} {line}" for line in body]
    return "\n".join(out) + "\n"


def apply(netns_path, ifnames, protected_ports, rules, ephemeral_low):
    """Create or replace (one transaction: flows stay judged throughout)."""
    run_in_netns(netns_path, ["nft", "-f", "-"], stdin=script(ifnames, protected_ports, rules, ephemeral_low))


def remove(netns_path):
    run_in_netns(netns_path, ["nft", "-f", "-"], stdin=f"table netdev {TABLE}\ndelete table netdev {TABLE}\n")


def present(netns_path, ifnames):
    p = run_in_netns(netns_path, ["nft", "-j", "list", "table", "netdev", TABLE], check=False)
    if p.returncode != 0:
        return False
    chains = {item["chain"]["name"] for item in json.loads(p.stdout).get("nftables", [])
              if "chain" in item}
    return all(_chain(i) in chains for i in ifnames)


def counters(netns_path):
    p = run_in_netns(netns_path, ["nft", "-j", "list", "counters", "table", "netdev", TABLE], check=False)
    if p.returncode != 0:
        return {}
    out = {}
    for item in json.loads(p.stdout).get("nftables", []):
        counter = item.get("counter")
        if counter and counter.get("packets"):
            out[counter["name"]] = {"count": counter["packets"], "bytes": counter["bytes"]}
    return out
