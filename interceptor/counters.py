"""Reading the per-CPU stats map: sums over CPUs, by pod and reason label."""
import collections

from . import abi


def by_pod(maps):
    """{netns cookie: {reason label: {"count": n, "bytes": n}}}, summed over CPUs."""
    out = collections.defaultdict(dict)
    for key, per_cpu in maps.stats.items():
        name = abi.Reason.name_of(key.reason)
        label = name.lower() if name else f"reason_{key.reason}"
        out[key.netns_cookie][label] = {
            "count": sum(v.count for v in per_cpu),
            "bytes": sum(v.bytes for v in per_cpu),
        }
    return dict(out)
