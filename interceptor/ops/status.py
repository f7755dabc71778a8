"""`interceptor status`: one report object, three renderings (text, wide, json).

The JSON is the contract (documented in docs/status.md, `version` bumps on incompatible
changes); the text is rendered from the same object. Nothing here changes state.
"""
import contextlib
import ctypes
import ipaddress
import os
import platform
import textwrap
import time

from interceptor import abi, paths
from interceptor.kernel import libbpf, listeners, netns
from interceptor.pod import podrecord
from interceptor.datapath import node_state
from interceptor.datapath.maps import REPORTED, LayoutError, Maps
from interceptor.datapath.node_state import loaded_plan, missing_pins
from interceptor.datapath.plan import Mechanism
from interceptor.datapath.programs import CGROUP, FILTER_HOOKS, PROGRAMS, SOCKHASH, TAIL, TAIL_MAPS
from interceptor import pieces
from interceptor.ops import counters

REPORT_VERSION = 1
MAP_WARN_FRACTION = 0.8


def _addr(raw):
    ip = ipaddress.ip_address(bytes(raw))
    return ip.ipv4_mapped or ip


def _endpoint(raw, port):
    ip = _addr(raw)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _boot_now_ns():
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _headers():
    from interceptor.ops.doctor import headers_note
    try:
        detail, warning = headers_note()
    except OSError as exc:
        return {"detail": str(exc.strerror or exc), "borrowed": False, "warning": ""}
    return {"detail": detail, "borrowed": bool(warning), "warning": warning}


def _programs(node, plan):
    out = []
    for p in PROGRAMS:
        if not p.loaded(plan):
            continue    # per-pod copies are shown with the pod; others not in this plan
        info = libbpf.pinned_info(paths.prog_pin(p.name), libbpf.ProgInfo)
        entry = {"name": p.name, "pinned": info is not None, "id": info.id if info else None}
        if p.scope == CGROUP:
            entry["attached"] = f"cgroup {node.cgroup}" if os.path.exists(paths.link_pin(p.name)) else None
        elif p.scope == SOCKHASH:
            entry["attached"] = "bypass_socks" if node.bypass else None
        elif p.scope == TAIL:
            entry["attached"] = f"per pod, via {p.name.replace('_ingress', '_pod')}" if p.needed(plan) else None
        else:
            entry["attached"] = "per pod netns" if p.needed(plan) else None
        out.append(entry)
    return out


def _live_connections(maps, records, now):
    rows = []
    for key, conn in maps.redirected.items():
        if not conn.flags & abi.CONN_F_ESTABLISHED:
            continue    # a steered SYN that never completed, or a connect in flight
        outbound = conn.direction == abi.DIR_OUTBOUND
        rec = records.get(conn.netns_cookie)
        rows.append({
            "pod": rec.name if rec else f"cookie:{conn.netns_cookie}",
            "cookie": conn.netns_cookie,
            "direction": "outbound" if outbound else "inbound",
            # who connected: the app (outbound) or the remote client (inbound)
            "source": _endpoint(key.local, key.local_port) if outbound else _endpoint(key.remote, key.remote_port),
            "original_dst": _endpoint(conn.addr, conn.port),
            "proxy_port": conn.proxy_port,
            "bypassed": bool(conn.flags & abi.CONN_F_BYPASSED),
            "age_s": round(max(0, now - conn.created_ns) / 1e9, 1),
        })
    rows.sort(key=lambda r: (r["pod"], r["direction"], r["age_s"]))
    return rows


def _proxy_listening(rec, cookie, listener_keys):
    """Is the proxy listening on its ports? Inbound under eBPF: is its listener
    registered for sk_lookup (what steering actually uses); otherwise by sock_diag."""
    out = {"outbound": None, "inbound": None}
    if listener_keys is not None and rec.mode.get("inbound") == Mechanism.EBPF:
        out["inbound"] = any(k.netns_cookie == cookie for k in listener_keys)
    if rec.netns_exists():
        try:
            for direction, port in (("outbound", rec.settings.outbound_port),
                                    ("inbound", rec.settings.inbound_port)):
                if out[direction] is None:
                    out[direction] = listeners.listening(rec.netns, port)
        except OSError:
            pass
    return out


def _capabilities(plan):
    if plan is None:
        return {"outbound": "off", "inbound": "off", "bypass": "off", "ingress": "off"}

    def direction(d):
        return Mechanism.EBPF.value if plan.mechanism(d) == Mechanism.EBPF else str(plan.rules_backend)
    return {"outbound": direction("outbound"), "inbound": direction("inbound"),
            "bypass": "ebpf" if plan.bypass else "off", "ingress": plan.filter_text()}


INGRESS_DROP_LABELS = [name.lower() for name, _ in abi.Reason.items()
                       if name.startswith("INGRESS_DROPPED_")]


def _ingress(rec, c):
    """The pod's ingress filter: where it runs, what it dropped and why."""
    piece, applied = pieces.filter_of(rec) if rec else (None, None)
    if piece is None:
        return None
    interfaces, skipped = piece.describe(applied)
    dropped = {label[len("ingress_dropped_"):]: c.get(label, {}).get("count", 0)
               for label in INGRESS_DROP_LABELS}
    passed = sum(c.get(label, {}).get("count", 0) for label in
                 ("ingress_passed", "ingress_passed_non_ip", "ingress_passed_fragment"))
    return {
        "mechanism": piece.mechanism,
        "interfaces": [{"ifname": a["ifname"], "mode": a["mode"]} for a in interfaces],
        "skipped": [f"{a['ifname']} ({a['reason']})" for a in skipped],
        "protected_ports": rec.settings.filter_protected_ports(),
        "rules": len(rec.settings.ingress_policy),
        "passed": passed,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
    }


def collect(pod_filter=None):
    node, node_problem = node_state.read_node()          # the one read of the node state
    plan = loaded_plan(node) if node else None
    loaded = plan is not None
    missing = [] if loaded else missing_pins(node.plan if node and node.complete else None)
    report = {
        "version": REPORT_VERSION,
        "node": {
            "kernel": platform.release(),
            "loaded": loaded,
            "mode": plan.mode if plan else "none",
            "capabilities": _capabilities(plan),
            "pieces": (list(plan.pieces) or pieces.for_plan(plan)) if plan else [],
            "cgroup": node.cgroup if node else None,
            "datapath_version": node.datapath_version if node else None,
            "bypass": node.bypass if node else None,
            "headers": _headers(),
            "programs": [],
            # {program: the kernel's reason} for what the verifier refused at load
            "refused": dict(plan.refused) if plan else {},
            "pins_missing": [],
            "pods_enrolled": 0,
        },
        "maps": {}, "pods": [], "sockets": [], "errors": [], "warnings": [],
    }
    if node_problem:
        report["errors"].append(node_problem)
    if node and node.upgrading_to:
        report["errors"].append(f"an upgrade of the datapath to {node.upgrading_to} was interrupted: "
                                "its programs are of two builds (run `interceptor upgrade`, or "
                                "restart the agent)")
    if report["node"]["headers"]["warning"]:
        report["warnings"].append(report["node"]["headers"]["warning"])
    if plan:
        report["warnings"] += plan.fallbacks()
    report["node"]["pins_missing"] = missing
    if not loaded:
        if node or os.path.exists(paths.PIN_ROOT):
            report["errors"].append("incomplete load: missing " + (", ".join(missing) or paths.NODE_STATE)
                                    + " (run `interceptor load` to repair)")
        else:
            report["warnings"].append("datapath not loaded (run `interceptor load`)")
        return report
    records = podrecord.all_records()
    if plan.uses_bpf:
        report["node"]["programs"] = _programs(node, plan)
        try:
            maps = Maps().open_all()
        except LayoutError as exc:
            report["errors"].append(str(exc))
            return report
        with maps:
            enrolled, listener_keys, sockets = _from_maps(report, maps, records)
            stats = counters.by_pod(maps, records)
            for array in (TAIL_MAPS[FILTER_HOOKS[hook][0]] for hook in plan.bpf_filter_hooks):
                if getattr(maps, array).get(ctypes.c_uint32(0)) is None:
                    report["errors"].append(f"the ingress filter program is missing from {array}: "
                                            "pods' stubs on that hook pass every packet unfiltered "
                                            "(run `interceptor unload` and `load` to repair)")
    else:
        enrolled, listener_keys, sockets = set(), None, []
        stats = counters.by_pod(None, records)
    _pods(report, records, enrolled, listener_keys, sockets, stats, pod_filter)
    report["pods"].sort(key=lambda p: (p["pod"], p["cookie"]))
    names = {p["pod"] for p in report["pods"]}
    report["sockets"] = [s for s in sockets if not pod_filter or s["pod"] in names]
    report["node"]["pods_enrolled"] = len(enrolled | set(records))
    return report


def _from_maps(report, maps, records):
    for name in REPORTED:
        m = getattr(maps, name)
        entries, cap = len(m.keys()), m.info().max_entries
        report["maps"][name] = {"entries": entries, "capacity": cap,
                                "percent": round(100 * entries / cap, 1)}
        if entries > MAP_WARN_FRACTION * cap:
            report["warnings"].append(f"map {name} is {entries}/{cap} full")
    enrolled = {k.value for k in maps.pods.keys()}
    return enrolled, maps.inbound_listeners.keys(), _live_connections(maps, records, _boot_now_ns())


def _pods(report, records, enrolled, listener_keys, sockets, stats, pod_filter):
    from interceptor.ops.enrollment import verify
    for cookie in sorted(enrolled | set(records)):
        rec = records.get(cookie)
        name = rec.name if rec else f"cookie:{cookie}"
        if pod_filter and name != pod_filter:
            continue
        with contextlib.ExitStack() as visit:
            if rec and rec.netns_exists():
                try:       # one visit for every check below (netns.entered nests for free)
                    visit.enter_context(netns.entered(rec.netns))
                except OSError:
                    pass   # each check reports the namespace its own way
            problems = [str(p) for p in verify(rec, None)] if rec else \
                ["no record (enrolled behind interceptor's back?)"]
            proxy_listening = _proxy_listening(rec, cookie, listener_keys) if rec else {}
        live = [s for s in sockets if s["cookie"] == cookie]
        c = stats.get(cookie, {})
        pod = {
            "pod": name, "cookie": cookie, "netns": rec.netns if rec else None,
            "container_id": rec.container_id if rec else None,
            "addresses": rec.addresses if rec else [],
            "mode": rec.mode if rec else {"outbound": "unknown", "inbound": "unknown"},
            "pieces": [e.piece for e in rec.journal] if rec else [],
            "proxy_listening": proxy_listening,
            "redirected": {"outbound": c.get("out_redirected", {}).get("count", 0),
                           "inbound": c.get("in_steered", {}).get("count", 0)},
            "live": {"outbound": sum(s["direction"] == "outbound" for s in live),
                     "inbound": sum(s["direction"] == "inbound" for s in live)},
            "bypassed_sockets": sum(s["bypassed"] for s in live),
            "bypass_bytes": c.get("bypass_msg_redirected", {}).get("bytes", 0),
            "ingress": _ingress(rec, c),
            "counters": {k: v["count"] for k, v in sorted(c.items())},
            "problems": problems,
        }
        report["pods"].append(pod)
        if pod["ingress"] and pod["ingress"]["skipped"]:
            report["warnings"].append(f"{name}: no ingress filter on {', '.join(pod['ingress']['skipped'])}")
        for p in problems:
            report["errors"].append(f"{name}: {p}")
        loops = c.get("out_refused_proxy_loop", {}).get("count", 0)
        if loops:
            # the proxy had accepted connections it could not find a destination for
            # (sent to its capture port directly, or a full original-destination map)
            report["warnings"].append(f"{name}: {loops} connections of its proxy to its own "
                                      "capture port refused (it had no original destination)")
        listening = pod["proxy_listening"]
        if rec and listening.get("inbound") is False and listening.get("outbound") is False:
            policy = rec.settings.no_proxy
            report["warnings"].append(f"{name}: proxy not listening (connections are {policy}ed)"
                                      if policy == "reject" else
                                      f"{name}: proxy not listening (connections pass through)")


# --- text ---------------------------------------------------------------------------------
def _style(text, ok, color):
    if not color:
        return text
    import click
    return click.style(text, fg="green" if ok else "red")


def _row(key, value):
    return f"{key + ':':<14}{value}"


def render(report, wide=False, color=False):
    n = report["node"]
    caps = n["capabilities"]
    lines = [
        _row("Mode", f"{n['mode']} (outbound {caps['outbound']}, inbound {caps['inbound']}, "
                     f"bypass {caps['bypass']}, ingress {caps['ingress']})"),
        _row("Kernel", n["kernel"]),
    ]
    if not n["loaded"]:
        lines.append(_row("Loader", _style("not loaded", False, color)))
    else:
        progs = n["programs"]
        attached = sum(1 for p in progs if p["attached"] and p["attached"].startswith("cgroup"))
        ok = not n["pins_missing"]
        if progs:
            lines.append(_row("Loader", _style("OK" if ok else "incomplete", ok, color) +
                              f", {sum(p['pinned'] for p in progs)}/{len(progs)} programs pinned, "
                              f"{attached} attached, datapath {n['datapath_version'] or '-'}"))
            lines.append(_row("Cgroup", n["cgroup"]))
        else:
            lines.append(_row("Loader", _style("OK", True, color) + ", rules only (no BPF programs)"))
        healthy = sum(1 for p in report["pods"] if not p["problems"])
        lines.append(_row("Pods", f"{healthy}/{len(report['pods'])} healthy"))
        live_out = sum(1 for s in report["sockets"] if s["direction"] == "outbound")
        live_in = len(report["sockets"]) - live_out
        bypassed = sum(s["bypassed"] for s in report["sockets"])
        lines.append(_row("Connections", f"{live_out} outbound, {live_in} inbound live "
                                         f"({bypassed} bypassed)"))
        if report["maps"]:
            fullest = max(report["maps"].items(), key=lambda kv: kv[1]["percent"])
            lines.append(_row("Maps", f"{len(report['maps'])}, fullest {fullest[0]} "
                                      f"{fullest[1]['entries']}/{fullest[1]['capacity']} "
                                      f"({fullest[1]['percent']:g}%)"))
        if wide:
            lines.append(_row("Pieces", ", ".join(n["pieces"]) + " (per pod, in apply order)"))
            lines.append("")
            lines.append(f"{'PROGRAM':<16}{'ID':>6}  ATTACHED")
            for p in progs:
                lines.append(f"{p['name']:<16}{p['id'] or '-':>6}  {p['attached'] or '-'}")
            lines.append("")
            lines.append(f"{'MAP':<20}{'ENTRIES':>9}{'CAPACITY':>10}{'%':>7}")
            for name, m in report["maps"].items():
                lines.append(f"{name:<20}{m['entries']:>9}{m['capacity']:>10}{m['percent']:>7g}")
    if report["pods"]:
        lines.append("")
        lines += _pods_table(report["pods"], wide)
    if report["sockets"]:
        lines.append("")
        lines += sockets_table(report["sockets"], wide)
    for title in ("errors", "warnings"):
        if report[title]:
            lines += ["", f"{title.capitalize()}:"]
            for e in report[title]:
                lines += textwrap.wrap(e, 80, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)


_DIR = {"outbound": "out", "inbound": "in"}


def _yes(value):
    return "-" if value is None else ("yes" if value else "no")


def _pods_table(pods, wide):
    if wide:
        head = (f"{'POD':<24}{'COOKIE':>8} {'ADDRESSES':<30}{'PROXY OUT/IN':<14}"
                f"{'REDIR OUT':>10}{'REDIR IN':>9}{'LIVE':>6}{'BYPASS':>8}{'BYPASS BYTES':>14}"
                f"  {'FILTER':<18}{'DROPPED':>8}  NETNS")
    else:
        head = f"{'POD':<22}{'ADDRESS':<17}{'PROXY':<7}{'OUT':>6}{'IN':>6}{'LIVE':>6}{'BYPASS':>8}{'DROP':>7}"
    out = [head]
    for p in pods:
        listening = p["proxy_listening"]
        proxy = "yes" if listening.get("outbound") and listening.get("inbound") else (
            "no" if listening else "-")
        live = p["live"]["outbound"] + p["live"]["inbound"]
        ing = p["ingress"]
        dropped = ing["dropped"] if ing else "-"
        if wide:
            out.append(f"{p['pod']:<24}{p['cookie']:>8} {','.join(p['addresses']):<30}"
                       f"{_yes(listening.get('outbound')) + '/' + _yes(listening.get('inbound')):<14}"
                       f"{p['redirected']['outbound']:>10}{p['redirected']['inbound']:>9}{live:>6}"
                       f"{p['bypassed_sockets']:>8}{p['bypass_bytes']:>14}  {_filter(ing):<18}"
                       f"{dropped:>8}  {p['netns'] or '-'}")
        else:
            addr = p["addresses"][0] if p["addresses"] else "-"
            out.append(f"{p['pod'][:21]:<22}{addr[:16]:<17}{proxy:<7}{p['redirected']['outbound']:>6}"
                       f"{p['redirected']['inbound']:>6}{live:>6}{p['bypassed_sockets']:>8}{dropped:>7}")
    return out


def _filter(ing):
    """e.g. 'tc eth0', 'xdp eth0:native' or 'nftables eth0'."""
    if not ing:
        return "off"
    return ",".join(pieces.filter_label(ing["mechanism"], a) for a in ing["interfaces"])


def sockets_table(sockets, wide=False):
    if wide:
        out = [f"{'POD':<24}{'DIR':<5}{'SOURCE':<44}{'ORIGINAL DST':<44}{'PROXY':>6}{'BYPASS':>7}{'AGE':>8}"]
        for s in sockets:
            out.append(f"{s['pod']:<24}{_DIR[s['direction']]:<5}{s['source']:<44}{s['original_dst']:<44}"
                       f"{s['proxy_port']:>6}{_yes(s['bypassed']):>7}{s['age_s']:>7}s")
        return out
    out = [f"{'POD':<18}{'DIR':<5}{'SOURCE':<21}{'ORIGINAL DST':<21}{'PROXY':>6}{'BYP':>4}{'AGE':>5}"]
    for s in sockets:
        age = s["age_s"]
        age = f"{age:.0f}s" if age < 100 else f"{age / 60:.0f}m" if age < 6000 else f"{age / 3600:.0f}h"
        out.append(f"{s['pod'][:17]:<18}{_DIR[s['direction']]:<5}{s['source'][:20]:<21}"
                   f"{s['original_dst'][:20]:<21}{s['proxy_port']:>6}{_yes(s['bypassed']):>4}{age:>5}")
    return out
