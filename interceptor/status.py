"""`interceptor status`: one report object, rendered as text or JSON.

A basic version for the datapath issue: loader state, enrolled pods with their counters,
live redirected connections. Errors make the exit code 1."""
import ipaddress
import os
import platform
import time

from . import counters, paths, state
from .loader import expected_pins, is_loaded
from .maps import Maps


def _addr(raw):
    ip = ipaddress.ip_address(bytes(raw))
    return ip.ipv4_mapped or ip


def _boot_now_ns():
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def collect():
    node = state.read_json(paths.NODE_STATE) or {}
    report = {
        "node": {
            "kernel": platform.release(),
            "loaded": is_loaded(),
            "mode": "ebpf" if is_loaded() else "none",
            "bypass": node.get("bypass"),
            "cgroup": node.get("cgroup"),
        },
        "pods": [], "redirected": [], "maps": {}, "errors": [], "warnings": [],
    }
    missing = [p for p in expected_pins() if not os.path.exists(p)]
    if not report["node"]["loaded"]:
        if node or os.path.exists(paths.PIN_ROOT):
            report["errors"].append(f"incomplete load: missing {', '.join(missing) or 'node state'}")
        else:
            report["warnings"].append("datapath not loaded (run `interceptor load`)")
        return report
    records = state.pod_records()
    with Maps() as maps:
        stats = counters.by_pod(maps)
        for name in ("pods", "pod_addrs", "port_rules", "cidr_rules", "redirected", "stats"):
            m = getattr(maps, name)
            entries = len(m.keys())
            cap = m.info().max_entries
            report["maps"][name] = {"entries": entries, "capacity": cap}
            if entries > 0.8 * cap:
                report["warnings"].append(f"map {name} is {entries}/{cap} full")
        enrolled = {k.value for k in maps.pods.keys()}
        for cookie in sorted(enrolled | set(records)):
            rec = records.get(cookie, {})
            link = paths.pod_link_pin(cookie, "sk_lookup")
            pod = {
                "cookie": cookie, "pod": rec.get("pod"), "netns": rec.get("netns"),
                "addresses": rec.get("addresses", []),
                "inbound_attached": os.path.exists(link),
                "counters": {k: v["count"] for k, v in sorted(stats.get(cookie, {}).items())},
            }
            report["pods"].append(pod)
            name = rec.get("pod") or f"cookie {cookie}"
            if cookie not in enrolled:
                report["errors"].append(f"{name}: recorded but missing from the pods map")
            elif not rec:
                report["errors"].append(f"{name}: in the pods map but has no record")
            elif not os.path.exists(link):
                report["errors"].append(f"{name}: inbound sk_lookup link is missing")
        now = _boot_now_ns()
        for key, orig in maps.redirected.items():
            rec = records.get(orig.netns_cookie, {})
            report["redirected"].append({
                "pod": rec.get("pod") or str(orig.netns_cookie),
                "app": f"{_addr(key.local)}:{key.local_port}",
                "original_dst": f"{_addr(orig.addr)}:{orig.port}",
                "proxy": f"{_addr(key.remote)}:{key.remote_port}",
                "direction": "outbound",
                "age_s": round(max(0, now - orig.created_ns) / 1e9, 1),
            })
    report["node"]["pods_enrolled"] = len(report["pods"])
    return report


def render(report):
    n = report["node"]
    lines = [
        f"{'Mode:':<14}{n['mode']}",
        f"{'Kernel:':<14}{n['kernel']}",
        f"{'Loader:':<14}{'loaded' if n['loaded'] else 'not loaded'}"
        + (f" (cgroup {n['cgroup']}, bypass {'on' if n['bypass'] else 'off'})" if n["loaded"] else ""),
    ]
    if n["loaded"]:
        lines.append(f"{'Pods:':<14}{n['pods_enrolled']} enrolled")
        maps = [f"{k} {v['entries']}/{v['capacity']}" for k, v in report["maps"].items()]
        for i in range(0, len(maps), 3):    # three per line keeps 80 columns
            lines.append(f"{'Maps:' if i == 0 else '':<14}" + ", ".join(maps[i:i + 3]))
    if report["pods"]:
        lines += ["", f"{'POD':<24}{'ADDRESSES':<28}{'OUT':>6}{'IN':>6}{'BYPASS':>8}"]
        for p in report["pods"]:
            c = p["counters"]
            lines.append(f"{(p['pod'] or str(p['cookie']))[:23]:<24}"
                         f"{','.join(p['addresses'])[:27]:<28}"
                         f"{c.get('out_redirected', 0):>6}{c.get('in_steered', 0):>6}"
                         f"{c.get('bypass_msg_redirected', 0):>8}")
    if report["redirected"]:
        lines += ["", f"{'POD':<20}{'APP':<22}{'ORIGINAL DST':<26}{'AGE':>6}"]
        for r in report["redirected"]:
            lines.append(f"{r['pod'][:19]:<20}{r['app'][:21]:<22}{r['original_dst'][:25]:<26}"
                         f"{r['age_s']:>5}s")
    for title in ("errors", "warnings"):
        if report[title]:
            lines += ["", f"{title.capitalize()}:"] + [f"  - {e}" for e in report[title]]
    return "\n".join(lines)
