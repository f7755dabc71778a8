"""Rendering benchmark results: a terminal table (medians, min-max, per-round ratios to
iptables and to explicit), and PNG plots."""
import collections
import os
import statistics

from interceptor.harness.bench import cni as cni_bench

_METRIC = {"stream": ("gbit_s", "Gbit/s", "CPU ms/GB")}
_DEFAULT_METRIC = ("rps", "req/s", "CPU ms/1k")


TOPOLOGY_PREFIXES = ("x-node ", "x-machine ")


def _strip_topology(scenario):
    for prefix in TOPOLOGY_PREFIXES:
        if scenario.startswith(prefix):
            return scenario[len(prefix):]
    return scenario


def _kind(scenario):
    """rr, crr or stream, whatever the topology prefix."""
    return _strip_topology(scenario).split()[0]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _range(values):
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (None, None)


def _ratios(samples, mode, base, key):
    """Per-round ratio of mode to base, so drift between rounds cancels out."""
    by_round = {s["round"]: s[key] for s in samples.get(base, [])}
    out = [s[key] / by_round[s["round"]] for s in samples.get(mode, [])
           if by_round.get(s["round"]) and s[key] is not None]
    return out


def _fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _ratio_cell(ratios):
    if not ratios:
        return "-"
    lo, hi = min(ratios), max(ratios)
    return f"{statistics.median(ratios):.2f} ({lo:.2f}-{hi:.2f})" if len(ratios) > 1 else f"{ratios[0]:.2f}"


def render(results):
    s = results["settings"]
    env = results["env"]
    proxy = s.get("proxy", "haproxy")
    sidecar = f"Envoy {env.get('envoy') or ''} as Istio configures it".replace("  ", " ") \
        if proxy == "envoy" else "HAProxy"
    lines = [f"interceptor bench: {s['runs']} round(s) x {s['seconds']} s, modes interleaved; "
             f"kernel {env['kernel']}, {env['cpus']} CPU ({env['cpu']}); sidecars: {sidecar}",
             "Ratios are per round, then the median (min-max) over rounds.", ""]
    for scenario, samples in results["samples"].items():
        key, unit, cpu_unit = _METRIC.get(_kind(scenario), _DEFAULT_METRIC)
        digits = 2 if key == "gbit_s" else 0
        latency = key == "rps"
        lines.append(f"== {scenario}")
        head = f"{'mode':<22}{unit + ' median':>16}{'min-max':>22}"
        if latency:
            head += f"{'p50 ms':>9}{'p99 ms':>9}"
        head += f"{cpu_unit + ' sidecars':>20}{'total':>11}{'vs iptables':>20}{'vs explicit':>20}"
        lines.append(head)
        for mode, runs in samples.items():
            values = [r[key] for r in runs]
            lo, hi = _range(values)
            row = f"{mode:<22}{_fmt(_median(values), digits):>16}{_fmt(lo, digits) + ' - ' + _fmt(hi, digits):>22}"
            if latency:
                row += f"{_fmt(_median([r['p50_ms'] for r in runs]), 2):>9}{_fmt(_median([r['p99_ms'] for r in runs]), 2):>9}"
            row += (f"{_fmt(_median([r['sidecars_ms'] for r in runs]), 1):>20}"
                    f"{_fmt(_median([r['total_ms'] for r in runs]), 1):>11}"
                    f"{_ratio_cell(_ratios(samples, mode, 'iptables', key)):>20}"
                    f"{_ratio_cell(_ratios(samples, mode, 'explicit', key)):>20}")
            lines.append(row)
        for mode, runs in samples.items():
            errors = sum(r.get("socket_errors", 0) + r.get("bad_responses", 0) for r in runs)
            failed = [r["error"] for r in runs if r.get("error")]
            if errors or _kind(scenario) == "crr":   # failed requests, zero included
                kinds = collections.Counter()
                for r in runs:
                    kinds.update(r.get("socket_error_kinds", {}))
                what = ", ".join(f"{k} {n}" for k, n in kinds.items() if n)
                lines.append(f"  {mode}: {errors} socket errors or non-2xx responses in "
                             f"{sum(r.get('requests', 0) for r in runs):,} requests"
                             + (f" ({what})" if what else ""))
            if failed:
                lines.append(f"  {mode}: {len(failed)} of {len(runs)} runs failed ({failed[0]})")
        lines.append("")
    if results.get("rules"):
        rules = results["rules"]
        sizes = sorted({int(n) for m in rules.values() for n in m})
        lines.append("== rules: new connections/s (wrk c=8, Connection: close) as the client pod's "
                     "exclusion lists grow (N CIDRs + N ports, none matching)")
        lines.append(f"{'N':>8}" + "".join(f"{m:>14}" for m in rules) + f"{'ebpf/iptables':>16}")
        for n in sizes:
            med = {m: _median([r["rps"] for r in rules[m].get(str(n), [])]) for m in rules}
            ebpf_mode = "ebpf-nobypass" if "ebpf-nobypass" in med else "ebpf"
            ratio = (med[ebpf_mode] / med["iptables"]) if med.get(ebpf_mode) and med.get("iptables") else None
            lines.append(f"{n:>8}" + "".join(f"{_fmt(med[m]):>14}" for m in rules) + f"{_fmt(ratio, 2):>16}")
        lines.append(f"each mode at N vs at N={sizes[0]}, per round: median (min-max)")
        lines.append(f"{'N':>8}" + "".join(f"{m:>22}" for m in rules))
        for n in sizes[1:]:
            cells = []
            for m in rules:
                base = {r.get("round"): r["rps"] for r in rules[m].get(str(sizes[0]), [])}
                ratios = [r["rps"] / base[r.get("round")] for r in rules[m].get(str(n), [])
                          if base.get(r.get("round"))]
                cells.append(_ratio_cell(ratios))
            lines.append(f"{n:>8}" + "".join(f"{c:>22}" for c in cells))
        lines.append("")
    if results.get("rules_options"):
        opts = results["rules_options"]
        lines.append("== rules: Istio's options (owner users and groups, several proxy uids/gids, an "
                     "excluded interface, a port range, DNS capture, a skip mark) on the smallest lists, "
                     "new connections/s")
        lines.append(f"{'mode':>16}{'without':>12}{'with':>12}{'with/without, per round':>30}")
        for mode, shapes in opts.items():
            base = {r.get("round"): r["rps"] for r in shapes.get("plain", [])}
            ratios = [r["rps"] / base[r.get("round")] for r in shapes.get("istio", []) if base.get(r.get("round"))]
            lines.append(f"{mode:>16}{_fmt(_median([r['rps'] for r in shapes.get('plain', [])])):>12}"
                         f"{_fmt(_median([r['rps'] for r in shapes.get('istio', [])])):>12}"
                         f"{_ratio_cell(ratios):>30}")
        lines.append("")
    if results.get("xdp"):
        from interceptor.harness.bench.xdp import render as render_xdp
        lines.append(render_xdp(results["xdp"]))
        lines.append("")
    if results.get("cni"):
        lines.append("== cni: plugin latency as the runtime sees it")
        lines.append(cni_bench.render(results["cni"]))
    return "\n".join(lines)


def save(out_dir, results, text):
    """A bench module's results.json and summary.txt in out_dir; the summary is printed."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


def plots(results, out_dir):
    """latency.png (rr percentiles per mode) and rules.png (the scaling curve)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rr = [s for s in results["samples"] if _kind(s) == "rr"]
    if rr:
        cols = min(len(rr), 2)
        rows = (len(rr) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        for ax, scenario in zip([a for row in axes for a in row], rr):
            samples = results["samples"][scenario]
            names = list(samples)
            for i, pct in enumerate(("p50_ms", "p90_ms", "p99_ms")):
                values = [_median([r[pct] for r in samples[m]]) or 0 for m in names]
                ax.bar([x + i * 0.27 for x in range(len(names))], values, width=0.27, label=pct[:-3])
            ax.set_xticks([x + 0.27 for x in range(len(names))], names, rotation=30, ha="right")
            ax.set_ylabel("latency, ms (median over rounds)")
            where = {"x-node": "cross-node", "x-machine": "two machines"}.get(scenario.split()[0], "same node")
            ax.set_title(f"HTTP {_strip_topology(scenario)} through two sidecars, {where}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "latency.png"), dpi=110)
        plt.close(fig)
    if results.get("rules"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, by_size in results["rules"].items():
            sizes = sorted(int(n) for n in by_size)
            ax.plot(sizes, [_median([r["rps"] for r in by_size[str(n)]]) for n in sizes], marker="o", label=mode)
        ax.set_xscale("log")
        ax.set_xlabel("excluded CIDRs and ports (none matching)")
        ax.set_ylabel("new connections/s")
        ax.set_title("Connection setup as exclusion lists grow")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "rules.png"), dpi=110)
        plt.close(fig)
