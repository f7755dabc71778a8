"""Ingress policy rules: their text form, validation, and the map entries that encode
them for the XDP program (bpf/xdp_ingress.c). Pure logic, no kernel access.

A rule is `ACTION [from CIDR] [PROTO] [port N]`:
    deny from 10.0.0.0/8 tcp port 22
    allow tcp port 8080
    deny from 2001:db8::/32
ACTION is deny or allow; PROTO one of tcp, udp, sctp, icmp (ICMP or ICMPv6, by the
packet's family) or any (the default). Deny always wins. Once a pod has an allow rule,
new flows (TCP SYN, UDP to a port below the pod's ephemeral range) that no allow rule
matches are dropped; replies and other protocols are judged by deny rules only.

Encoding: the source address goes through an LPM trie to a *source set*, one per
distinct prefix (per family), and each set holds every rule whose CIDR contains that
prefix; the set's rules are {proto|0, port|0} -> MATCH_* bits. So the program needs one
trie lookup and at most four hash lookups whatever the number of rules. Set ids are a
hash of the prefix, stable across edits, so a live change never renumbers the set an
established flow's packets are judged by.
"""
import ipaddress
import zlib

from interceptor import abi
from interceptor.pod.parsing import parse_port

PROTOCOLS = {"any": 0, "tcp": 6, "udp": 17, "sctp": 132, "icmp": None}
PORT_PROTOCOLS = ("any", "tcp", "udp", "sctp")
ICMP = {4: 1, 6: 58}
ACTIONS = {"deny": abi.MATCH_DENY, "allow": abi.MATCH_ALLOW}
MAX_RULES_PER_POD = 1024
MAX_ENTRIES_PER_POD = 16384


class PolicyError(ValueError):
    pass


def parse_rule(value):
    """A rule from its text or from {"action", "from", "protocol", "port"}; returns the
    normalised dict (the form kept in pod records)."""
    if isinstance(value, dict):
        unknown = set(value) - {"action", "from", "protocol", "port"}
        if unknown:
            raise PolicyError(f"unknown rule keys: {', '.join(sorted(unknown))}")
        action, cidr = value.get("action"), value.get("from")
        proto, port = value.get("protocol", "any"), value.get("port")
    elif isinstance(value, str):
        action, cidr, proto, port = _parse_text(value)
    else:
        raise PolicyError(f"{value!r} is not a rule")
    # isinstance first: a JSON list or object here is not hashable
    if not isinstance(action, str) or action not in ACTIONS:
        raise PolicyError(f"{value!r}: action must be deny or allow")
    if not isinstance(proto, str) or proto not in PROTOCOLS:
        raise PolicyError(f"{value!r}: protocol must be one of {', '.join(PROTOCOLS)}")
    rule = {"action": action, "from": None, "protocol": proto, "port": None}
    if cidr is not None:
        try:
            rule["from"] = str(ipaddress.ip_network(str(cidr), strict=False))
        except ValueError:
            raise PolicyError(f"{value!r}: {cidr!r} is not a CIDR") from None
    if port is not None:
        if proto not in PORT_PROTOCOLS:
            raise PolicyError(f"{value!r}: {proto} has no ports")
        try:
            rule["port"] = parse_port(port, repr(value))
        except ValueError as exc:
            raise PolicyError(f"{exc} (one port per rule)") from None
    return rule


def _parse_text(text):
    words = text.split()
    if not words:
        raise PolicyError("empty rule")
    action, cidr, proto, port = words[0], None, "any", None
    rest = words[1:]
    while rest:
        word = rest.pop(0)
        if word == "from" and rest:
            cidr = rest.pop(0)
        elif word == "port" and rest:
            port = rest.pop(0)
        elif word in PROTOCOLS:
            proto = word
        else:
            raise PolicyError(f"{text!r}: unexpected {word!r} (expected "
                              "ACTION [from CIDR] [PROTO] [port N])")
    return action, cidr, proto, port


def parse_rules(values):
    """A list of rules (texts or dicts), or one string of rules separated by ';'.
    Duplicates are dropped; order is kept (it does not change the verdict)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [v for v in values.split(";") if v.strip()]
    if not isinstance(values, (list, tuple)):
        raise PolicyError(f"{values!r} is not a list of rules")
    out = []
    for v in values:
        rule = parse_rule(v)
        if rule not in out:
            out.append(rule)
    if len(out) > MAX_RULES_PER_POD:
        raise PolicyError(f"{len(out)} rules: at most {MAX_RULES_PER_POD} per pod")
    return out


def rule_text(rule):
    parts = [rule["action"]]
    if rule["from"]:
        parts += ["from", rule["from"]]
    if rule["protocol"] != "any":
        parts.append(rule["protocol"])
    if rule["port"]:
        parts += ["port", str(rule["port"])]
    return " ".join(parts)


def allow_only(rules):
    return any(r["action"] == "allow" for r in rules)


def _set_id(net):
    return (zlib.crc32(f"{net.version}/{net}".encode()) & 0x7FFFFFFF) | 1


def entries(rules):
    """The map content for one pod's rules:
    sources {(cidr_kind, network): set_id} and
    rule_bits {(set_id, proto, port): MATCH_* bits}."""
    sources, rule_bits = {}, {}
    parsed = [(r, ipaddress.ip_network(r["from"]) if r["from"] else None) for r in rules]
    for version, kind in ((4, abi.CidrKind.INGRESS_V4), (6, abi.CidrKind.INGRESS_V6)):
        mine = [(r, n) for r, n in parsed if n is None or n.version == version]
        if not mine:
            continue
        prefixes = {n for _, n in mine if n is not None}
        if any(n is None for _, n in mine):
            prefixes.add(ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0"))
        for prefix in prefixes:
            set_id = _set_id(prefix)
            if set_id in sources.values():
                raise PolicyError(f"source set id collision for {prefix}; change a CIDR")
            sources[(kind, prefix)] = set_id
            for r, n in mine:
                if n is not None and not prefix.subnet_of(n):
                    continue
                proto = ICMP[version] if r["protocol"] == "icmp" else PROTOCOLS[r["protocol"]]
                key = (set_id, proto, r["port"] or 0)
                rule_bits[key] = rule_bits.get(key, 0) | ACTIONS[r["action"]]
    if len(rule_bits) > MAX_ENTRIES_PER_POD:
        raise PolicyError(f"these rules need {len(rule_bits)} map entries "
                          f"(at most {MAX_ENTRIES_PER_POD} per pod): use fewer nested CIDRs")
    return sources, rule_bits


def rule_key(cookie, set_id, proto, port):
    return abi.IngressRuleKey(netns_cookie=cookie, source_set=set_id, proto=proto, port=port)
