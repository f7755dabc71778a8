"""`interceptor agent`: the node component, run by a Kubernetes DaemonSet.

On start it loads the datapath or adopts the one already pinned, installs the CNI plugin
and keeps it chained (cni/chain.py), and reconciles: records of pods whose network
namespace is gone are removed, and pod sandboxes that started while the plugin was not
in place (found through the runtime's CRI socket) are enrolled with the settings the
plugin would have computed. Then it watches the CNI conf dir (re-chaining within a
second of a change) and reconciles periodically. /healthz, /readyz and /metrics share
one HTTP server. It also answers the plugin's requests in-process (cni/server.py): the
installed plugin is a static front that hands them over and, while the agent is not
there, fails ADD closed (CNI error 11: the kubelet retries) and lets DEL succeed.

On SIGTERM it leaves everything in place, datapath, enrolled pods and chain: a restart
or rolling update must open no window in which pods start uncaptured or lose capture.
Removal is `interceptor uninstall`.
"""
import dataclasses
import http.server
import json
import os
import threading
import time

from interceptor import paths, store
from interceptor.kernel import netns
from interceptor.pod import podrecord
from interceptor.datapath import node_state
from interceptor.ops import enrollment, ensure, loader
from interceptor.cni import (chain as cni_chain, config as cni_config, install as cni_install,
                             server as cni_server)

# the agent's datapath event counted for what ensure did (KEEP: "adopted", once)
_COUNTED = {ensure.Action.LOAD: "loaded", ensure.Action.REPAIR: "loaded", ensure.Action.UPGRADE: "upgraded"}


@dataclasses.dataclass
class AgentConfig:
    cni_bin_dir: str = cni_install.DEFAULT_BIN_DIR
    cni_conf_dir: str = cni_install.DEFAULT_CONF_DIR
    cni_conf_name: str = cni_chain.OWNED_NAME
    plugin_entry: dict = dataclasses.field(default_factory=cni_install.plugin_entry)
    mode: str = "auto"
    bypass: bool = False
    cri_socket: str | None = None     # the runtime's CRI socket, for sandboxes started before us
    reconcile_every: float = 30.0
    map_sizes: dict = dataclasses.field(default_factory=dict)   # declared: others get defaults


@dataclasses.dataclass
class AgentCounters:
    """The agent's own metrics (besides the datapath's)."""
    chain_repairs: int = 0            # re-chained after a change to the conf dir
    reconciled: dict = dataclasses.field(default_factory=lambda: {"enrolled": 0, "removed": 0, "failed": 0})
    datapath: dict = dataclasses.field(
        default_factory=lambda: {"loaded": 0, "adopted": 0, "upgraded": 0, "refused": 0})


class Agent:
    def __init__(self, config, log=print):
        self.config = config
        self.log = log
        self.counters = AgentCounters()
        self.chain = None             # cni_chain.ChainState of the last sync
        self._chained_once = False    # a write after the first one is a repair
        self.datapath_problem = "not started"
        self.plugin_problem = None    # why the plugin could not be installed
        self.heartbeat = time.monotonic()
        self._lock = threading.Lock()     # the HTTP thread reads what the main loop writes
        self.cni_server = cni_server.CniServer(log)

    # --- the datapath ------------------------------------------------------------------
    def ensure_datapath(self):
        """Load, adopt what is loaded, or upgrade it in place (ensure.py decides, as for
        `interceptor load` and `upgrade`, with the agent's own rules: another version or
        other declared map sizes are upgraded). A datapath that cannot be upgraded in
        place (a map's layout changed) or was loaded with another --mode stays as it is,
        its pods captured, and the agent is not ready, saying why."""
        request = ensure.Request(ensure.Asker.AGENT, mode=self.config.mode,
                                 map_sizes=self.config.map_sizes, bypass=self.config.bypass)
        try:
            outcome = ensure.ensure(request, log=self.log)
        except ensure.Refused as exc:
            self._not_ready(f"{exc}; then restart the agent", "refused")
            return
        except ensure.UpgradeError as exc:
            self._not_ready(str(exc), "refused")
            return
        except ensure.LoadError as exc:
            self._not_ready(f"cannot load the datapath: {exc}")
            return
        if outcome.action == ensure.Action.KEEP:
            if self.datapath_problem:
                self.counters.datapath["adopted"] += 1
                self.log(f"adopted the loaded datapath {outcome.version}")
        else:
            self.counters.datapath[_COUNTED[outcome.action]] += 1
            self.log(f"datapath {outcome.version}: {outcome.summary}")
        self.datapath_problem = None

    def _not_ready(self, problem, counter=None):
        """Counted and logged once per new problem (the agent retries every pass)."""
        if problem != self.datapath_problem:
            if counter:
                self.counters.datapath[counter] += 1
            self.log(problem)
        self.datapath_problem = problem

    # --- the CNI chain -----------------------------------------------------------------
    def install_plugin(self):
        """The static front into the CNI bin dir; a package without it built (installed
        from source without a C compiler) leaves the agent not ready, saying so."""
        try:
            for line in cni_install.install_binary(self.config.cni_bin_dir, cni_install.Runner.AGENT):
                self.log(line)
        except (cni_install.InstallError, OSError) as exc:
            if str(exc) != self.plugin_problem:
                self.log(f"cannot install the plugin: {exc}")
            self.plugin_problem = str(exc)
            return
        self.plugin_problem = None

    def sync_chain(self):
        before = self.chain
        chain = cni_chain.sync(self.config.cni_conf_dir, self.config.plugin_entry, self.config.cni_conf_name)
        with self._lock:
            self.chain = chain
        if chain.action:
            if self._chained_once and chain.in_place:
                self.counters.chain_repairs += 1
            self.log(chain.action)
        self._chained_once = self._chained_once or chain.in_place
        if chain.problem and (before is None or before.problem != chain.problem):
            self.log(chain.problem)

    # --- reconcile ---------------------------------------------------------------------
    def reconcile(self):
        removed = self._remove_gone()
        enrolled = self._enroll_missed() if self.config.cri_socket and not self.datapath_problem else 0
        if removed or enrolled:
            self.log(f"reconciled: {enrolled} enrolled, {removed} removed")

    def _remove_gone(self):
        gone = []
        for cookie, rec in podrecord.all_records().items():
            if not rec.netns_exists():
                gone.append(cookie)
                continue
            try:
                if netns.cookie_of(rec.netns) != cookie:
                    gone.append(cookie)       # the path names another namespace now
            except OSError:
                gone.append(cookie)
        for cookie in gone:
            enrollment.unenroll(cookie=cookie)
            self.counters.reconciled["removed"] += 1
        return len(gone)

    def _enroll_missed(self):
        from interceptor.agent import cri
        try:
            sandboxes = cri.Runtime(self.config.cri_socket).ready_sandboxes()
        except cri.CriError as exc:
            self.log(f"reconcile: {exc}")
            return 0
        known = {rec.container_id for rec in podrecord.all_records().values()}
        enrolled = 0
        for sb in sandboxes:
            if sb.id in known or not sb.netns:
                continue
            config = dict(self.config.plugin_entry,
                          runtimeConfig={cni_config.ANNOTATIONS_CAPABILITY: sb.annotations})
            try:
                decision = cni_config.decide(config, {"K8S_POD_NAMESPACE": sb.namespace,
                                                      "K8S_POD_NAME": sb.name})
                if not decision.enroll:
                    continue
                enrollment.enroll(sb.netns, decision.settings, pod=decision.pod,
                                  container_id=sb.id, ifname="eth0")
            except (cni_config.ConfigError, enrollment.EnrollError, OSError) as exc:
                self.counters.reconciled["failed"] += 1
                self.log(f"reconcile: {sb.namespace}/{sb.name}: {exc}")
                continue
            self.counters.reconciled["enrolled"] += 1
            self.log(f"reconcile: enrolled {decision.pod} (sandbox {sb.id[:12]}, started before the chain)")
            enrolled += 1
        return enrolled

    # --- health ------------------------------------------------------------------------
    def readiness(self):
        """(ready, reasons): the datapath loaded and ours, and the chain in place."""
        reasons = []
        if self.datapath_problem:
            reasons.append(self.datapath_problem)
        elif not node_state.is_loaded():
            reasons.append("the datapath is not loaded")
        if self.plugin_problem:
            reasons.append(f"the CNI plugin is not installed: {self.plugin_problem}")
        with self._lock:
            chain = self.chain
        if chain is None or not chain.in_place:
            reasons.append(chain.problem if chain and chain.problem else "the CNI chain is not in place")
        return not reasons, reasons

    def alive(self):
        return time.monotonic() - self.heartbeat < 3 * self.config.reconcile_every + 10

    # --- the loop ----------------------------------------------------------------------
    def start(self):
        os.makedirs(self.config.cni_conf_dir, exist_ok=True)
        self.ensure_datapath()
        self.cni_server.start()       # before the chain: the plugin may be called at once
        self.install_plugin()
        self.sync_chain()
        self.reconcile()

    def run(self, stop):
        """Until stop (a threading.Event) is set. Changes to the conf dir re-chain at once;
        every reconcile_every seconds the datapath, the chain and the pods are checked."""
        from interceptor.agent.dirwatch import DirWatch
        watch = DirWatch(self.config.cni_conf_dir)
        next_reconcile = time.monotonic() + self.config.reconcile_every
        try:
            while not stop.is_set():
                self.heartbeat = time.monotonic()
                if not self.cni_server.healthy():
                    self.log("cni server: the socket was removed; serving it again")
                    self.cni_server.close()
                    self.cni_server.start()
                if watch.wait(min(1.0, max(0.0, next_reconcile - time.monotonic()))):
                    time.sleep(0.05)     # let a burst of writes settle, then look once
                    watch.wait(0)
                    if watch.stale():    # the conf dir itself was removed or replaced
                        watch.close()
                        os.makedirs(self.config.cni_conf_dir, exist_ok=True)
                        watch = DirWatch(self.config.cni_conf_dir)
                    self.sync_chain()
                if time.monotonic() >= next_reconcile:
                    self.ensure_datapath()
                    self.install_plugin()
                    self.sync_chain()
                    self.reconcile()
                    next_reconcile = time.monotonic() + self.config.reconcile_every
        finally:
            watch.close()
            # from now on the plugin's front answers ADD with error 11 (try again later)
            self.cni_server.close()


# --- HTTP: /healthz, /readyz, /metrics -----------------------------------------------------
def _registry(agent):
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from interceptor.agent.metrics import DatapathCollector

    class AgentCollector:
        def collect(self):
            c = agent.counters
            ready = GaugeMetricFamily("interceptor_agent_ready", "1 when the agent is ready.")
            ready.add_metric([], 1 if agent.readiness()[0] else 0)
            yield ready
            repairs = CounterMetricFamily("interceptor_agent_chain_repairs",
                                          "Times the CNI chain was re-made after the conf dir changed.")
            repairs.add_metric([], c.chain_repairs)
            yield repairs
            pods = CounterMetricFamily("interceptor_agent_reconciled_pods",
                                       "Pods enrolled or removed by reconcile.", labels=["action"])
            for action, n in sorted(c.reconciled.items()):
                pods.add_metric([action], n)
            yield pods
            events = CounterMetricFamily("interceptor_agent_datapath_events",
                                         "Datapath loaded, adopted, upgraded in place, or refused "
                                         "(another version that cannot be upgraded in place).",
                                         labels=["event"])
            for event, n in sorted(c.datapath.items()):
                events.add_metric([event], n)
            yield events
            served = CounterMetricFamily("interceptor_agent_cni_requests",
                                         "CNI requests the plugin's front handed to the agent, by "
                                         "command and answer (answered; not_mine: another pin root "
                                         "or run dir; expired: queued, or waiting for the node "
                                         "lock, past the front's deadline, dropped; failed: the front ran the plugin itself).",
                                         labels=["command", "answer"])
            for (command, answer), n in sorted(agent.cni_server.snapshot().items()):
                served.add_metric([command, answer], n)
            yield served

    registry = CollectorRegistry()
    registry.register(DatapathCollector())
    registry.register(AgentCollector())
    return registry


def serve_http(agent, host, port):
    """Start the HTTP server in a thread; returns the server (shutdown() to stop)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    registry = _registry(agent)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                ok = agent.alive()
                self._reply(200 if ok else 503, "ok\n" if ok else "main loop stalled\n")
            elif self.path == "/readyz":
                ready, reasons = agent.readiness()
                # ready on a fallback still says which program the kernel refused, and why
                plan = node_state.node_plan()
                notes = "".join(f"fallback: {line}\n" for line in (plan.fallbacks() if plan else []))
                self._reply(200 if ready else 503, ("ready\n" if ready else "\n".join(reasons) + "\n") + notes)
            elif self.path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, "not found\n")

        def _reply(self, code, body, ctype="text/plain; charset=utf-8"):
            data = body if isinstance(body, bytes) else body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass      # probes every few seconds would drown the agent's own log

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def load_plugin_entry(path):
    """The plugin's entry in the chain, from a file (a ConfigMap): a JSON object."""
    with open(path) as f:
        entry = json.load(f)
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a JSON object (the plugin's entry in the conflist)")
    entry.pop("type", None)
    return entry


def uninstall(cni_bin_dir, cni_conf_dir, cni_conf_name=cni_chain.OWNED_NAME, log=print):
    """Everything off the node: the chain first (so no new pod is sent to a plugin that
    is about to go; a DEL for an existing one then runs the primary's config alone),
    the plugin, a hand install's edit, every pod, the datapath (an ADD that started
    before the chain went finishes under the node lock; unload, taking the lock after
    it, removes that pod too). Idempotent."""
    for line in cni_chain.remove(cni_conf_dir, cni_conf_name):
        log(line)
    try:
        for line in cni_install.uninstall(cni_bin_dir, cni_conf_dir):
            log(line)
    except cni_install.InstallError:
        pass      # no conf dir or no configuration: nothing chained by hand either
    for line in cni_install.remove_binary(cni_bin_dir):
        log(line)
    loader.unload(log)
    for path in (paths.LOCK, paths.OPSTATS, cni_server.socket_path()):
        store.remove(path)
    cni_server.remove_stale_temporaries(everyone=True)
    try:
        os.rmdir(paths.RUN_DIR)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log(f"left {paths.RUN_DIR}: {exc.strerror}")
