"""Per-pod counters by reason label, whatever serves the pod: the datapath's per-CPU
stats map (summed over CPUs) and, for directions on REDIRECT rules, the rules' own
counters (each rule carries its reason label as comment), and the nftables ingress
filter's named counters."""
import collections

from . import abi, ingress, rules


def from_maps(maps):
    """{netns cookie: {reason label: {"count": n, "bytes": n}}} from the stats map."""
    out = collections.defaultdict(dict)
    for key, per_cpu in maps.stats.items():
        name = abi.Reason.name_of(key.reason)
        label = name.lower() if name else f"reason_{key.reason}"
        out[key.netns_cookie][label] = {
            "count": sum(v.count for v in per_cpu),
            "bytes": sum(v.bytes for v in per_cpu),
        }
    return dict(out)


def by_pod(maps, records=None):
    """Counters of every pod: the stats map (maps may be None in a rules-only mode)
    merged with the counters of the rules applied in each recorded pod's netns."""
    out = from_maps(maps) if maps is not None else {}
    for cookie, rec in (records or {}).items():
        applied = rec.get("rules")
        found = dict(ingress.counters(rec))
        if applied and not rules.netns_gone(rec.get("netns")):
            for label, value in rules.backend_named(applied["backend"]).counters(rec["netns"]).items():
                found[label] = value
        if not found:
            continue
        pod = out.setdefault(cookie, {})
        for label, value in found.items():
            mine = pod.setdefault(label, {"count": 0, "bytes": 0})
            mine["count"] += value["count"]
            mine["bytes"] += value["bytes"]
    return out
