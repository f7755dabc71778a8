"""Per-pod counters by reason label, whatever serves the pod: the datapath's per-CPU
stats map (summed over CPUs) merged with the counters each of the pod's pieces keeps
outside it (REDIRECT rules carry their reason label as comment, the nftables ingress
filter has named counters)."""
import collections

from interceptor import abi


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
    merged with those its pieces keep (records: {cookie: PodRecord})."""
    from interceptor.ops.enrollment import counters as kept_by_pieces
    out = from_maps(maps) if maps is not None else {}
    for cookie, rec in (records or {}).items():
        found = kept_by_pieces(rec)
        if not found:
            continue
        pod = out.setdefault(cookie, {})
        for label, value in found.items():
            mine = pod.setdefault(label, {"count": 0, "bytes": 0})
            mine["count"] += value["count"]
            mine["bytes"] += value["bytes"]
    return out
