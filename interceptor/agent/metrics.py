"""Prometheus metrics, read from the pinned maps and the ops counters at every scrape.

Names follow Prometheus conventions (`interceptor_` prefix, `_total` for counters, base
units). Pod labels exist only on series bounded by the number of enrolled pods. The
per-CPU counters are summed over CPUs by counters.by_pod().
"""
from prometheus_client import start_http_server
from prometheus_client.core import (REGISTRY, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from interceptor.pod import podrecord
from interceptor.datapath.maps import REPORTED, Maps
from interceptor.datapath.node_state import loaded_plan
from interceptor import pieces
from interceptor.ops import counters, opstats
from interceptor.ops.opstats import DURATION_BUCKETS

# Datapath reason label (abi.Reason names in lower case) -> (metric, extra labels);
# reasons not listed go to the skipped / bypass / other families below.
_REASON_METRICS = {
    "out_redirected": ("redirected_connections", {"direction": "outbound"}),
    "in_steered": ("redirected_connections", {"direction": "inbound"}),
    "orig_dst_answered": ("original_dst_answers", {"result": "answered"}),
    "orig_dst_unknown": ("original_dst_answers", {"result": "unknown"}),
    "orig_dst_own_address": ("original_dst_answers", {"result": "own_address"}),
    # the proxy's own connection to its pod, sent to its inbound port (Istio does)
    "out_self_to_inbound": ("redirected_connections", {"direction": "self"}),
    "out_passthrough_no_proxy": ("no_proxy_decisions", {"direction": "outbound", "decision": "passthrough"}),
    "out_rejected_no_proxy": ("no_proxy_decisions", {"direction": "outbound", "decision": "reject"}),
    "in_passthrough_no_proxy": ("no_proxy_decisions", {"direction": "inbound", "decision": "passthrough"}),
    "in_rejected_no_proxy": ("no_proxy_decisions", {"direction": "inbound", "decision": "reject"}),
    "out_refused_proxy_loop": ("proxy_loops_refused", {}),
}
_HELP = {
    "redirected_connections": "Connections sent to the proxy, by direction.",
    "original_dst_answers": "SO_ORIGINAL_DST queries on proxy sockets, by result.",
    "no_proxy_decisions": "Connections seen while the proxy was not listening.",
    "proxy_loops_refused": "Connections of the proxy to its own capture port, refused (it had "
                           "no original destination for a connection and fell back to its own).",
    "skipped_connections": "Connections of enrolled pods not redirected, by reason.",
    "bypass_messages": "Messages moved by the same-host bypass (result: redirected, no_peer).",
    "bypass_bytes": "Bytes moved by the same-host bypass (result: redirected, no_peer).",
    "datapath_events": "Other datapath events, by reason.",
    "ingress_packets": "Packets judged by the pod's ingress filter (XDP or nftables), by verdict and reason.",
    "ingress_bytes": "Bytes judged by the pod's ingress filter, by verdict and reason.",
}


class DatapathCollector:
    def collect(self):
        plan = loaded_plan()
        loaded = plan is not None
        up = GaugeMetricFamily("interceptor_datapath_loaded", "1 when the eBPF datapath is loaded.")
        up.add_metric([], 1 if loaded else 0)
        yield up
        yield from self._ops()
        if not loaded:
            return
        yield self._refused(plan)
        records = podrecord.all_records()
        families = {}

        def family(name, labels):
            key = name
            if key not in families:
                families[key] = CounterMetricFamily(f"interceptor_{name}", _HELP[name],
                                                    labels=["pod", *labels])
            return families[key]

        if plan.uses_bpf:
            with Maps() as maps:
                by_pod = counters.by_pod(maps, records)
                enrolled = {k.value for k in maps.pods.keys()} | set(records)
                sizes = {name: (len(getattr(maps, name).keys()), getattr(maps, name).info().max_entries)
                         for name in REPORTED}
        else:
            by_pod, enrolled, sizes = counters.by_pod(None, records), set(records), {}
        for cookie, reasons in sorted(by_pod.items()):
            if cookie not in enrolled:
                continue
            pod = records[cookie].name if cookie in records else f"cookie:{cookie}"
            for label, value in reasons.items():
                if label in _REASON_METRICS:
                    name, extra = _REASON_METRICS[label]
                    family(name, list(extra)).add_metric([pod, *extra.values()], value["count"])
                elif label.startswith(("out_skip_", "in_skip_")):
                    direction = "outbound" if label.startswith("out_") else "inbound"
                    reason = label.split("_skip_", 1)[1]
                    family("skipped_connections", ["direction", "reason"]).add_metric(
                        [pod, direction, reason], value["count"])
                elif label.startswith("ingress_"):
                    verdict, _, reason = label[len("ingress_"):].partition("_")
                    reason = reason or "allowed"
                    family("ingress_packets", ["verdict", "reason"]).add_metric(
                        [pod, verdict, reason], value["count"])
                    family("ingress_bytes", ["verdict", "reason"]).add_metric(
                        [pod, verdict, reason], value["bytes"])
                elif label.startswith("bypass_msg_"):
                    result = label[len("bypass_msg_"):]
                    family("bypass_messages", ["result"]).add_metric([pod, result], value["count"])
                    family("bypass_bytes", ["result"]).add_metric([pod, result], value["bytes"])
                else:
                    family("datapath_events", ["reason"]).add_metric([pod, label], value["count"])
        yield from families.values()
        yield self._ingress_filters(records)
        pods = GaugeMetricFamily("interceptor_pods_enrolled", "Network namespaces enrolled.")
        pods.add_metric([], len(enrolled))
        yield pods
        entries = GaugeMetricFamily("interceptor_map_entries", "Entries in a datapath map.", labels=["map"])
        capacity = GaugeMetricFamily("interceptor_map_capacity", "Capacity of a datapath map.", labels=["map"])
        for name, (n, cap) in sizes.items():
            entries.add_metric([name], n)
            capacity.add_metric([name], cap)
        yield entries
        yield capacity

    @staticmethod
    def _refused(plan):
        """1 per program of the datapath the kernel refused at load, with the verifier's
        reason (bounded: a dozen programs, one reason each)."""
        from interceptor.datapath.programs import BY_NAME
        refused = GaugeMetricFamily("interceptor_datapath_program_refused",
                                    "1 per datapath program this kernel's verifier refused at load "
                                    "(its capability runs on the next mechanism down).",
                                    labels=["program", "capability", "reason"])
        for name, reason in sorted((plan.refused if plan else {}).items()):
            refused.add_metric([name, BY_NAME[name].serves if name in BY_NAME else "", reason], 1)
        return refused

    @staticmethod
    def _ingress_filters(records):
        info = GaugeMetricFamily("interceptor_ingress_filter", "1 per pod interface with an ingress "
                                 "filter; mode: tc, native or generic (XDP), or nftables.",
                                 labels=["pod", "interface", "mode"])
        for cookie, rec in sorted(records.items()):
            piece, applied = pieces.filter_of(rec)
            for a in piece.describe(applied)[0] if piece else []:
                info.add_metric([rec.name, a["ifname"], a["mode"]], 1)
        return info

    def _ops(self):
        ops = opstats.read()
        total = CounterMetricFamily("interceptor_operations", "Userspace operations (enroll, "
                                    "unenroll, CNI commands), by result.", labels=["operation", "result"])
        hist = HistogramMetricFamily("interceptor_cni_command_duration_seconds",
                                     "Time the CNI plugin took per command.", labels=["command"])
        for op, entry in sorted(ops.items()):
            for result in ("ok", "failed"):
                total.add_metric([op, result], entry.get(result, 0))
            d = entry.get("duration")
            if d and op.startswith("cni "):
                buckets = [(str(b), c) for b, c in zip(DURATION_BUCKETS, d["buckets"])]
                buckets.append(("+Inf", d["count"]))
                hist.add_metric([op[4:]], buckets, d["sum"])
        yield total
        yield hist


_registered = False


def register():
    global _registered
    if not _registered:
        REGISTRY.register(DatapathCollector())
        _registered = True


def serve(host, port):
    import time
    register()
    start_http_server(port, addr=host)
    print(f"serving metrics on http://{host}:{port}/metrics", flush=True)
    while True:
        time.sleep(3600)

