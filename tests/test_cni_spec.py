"""interceptor-cni driven the way a runtime drives a plugin: environment variables, the
network configuration on stdin, one JSON document on stdout. Against the real kernel:
enrollment state is checked in the pinned maps and links."""
import concurrent.futures
import ctypes
import ipaddress
import json
import os
import subprocess
import uuid

import pytest

from interceptor import abi, paths, store
from interceptor.kernel import libbpf, netns, rules
from interceptor.pod import ingress_policy, podrecord
from interceptor.datapath import node_state
from interceptor.datapath.maps import Maps, addr16
from interceptor import pieces
from interceptor.pieces import tc
from interceptor.ops import ensure, loader
from pyroute2 import netns as pyr_netns

from cnihelper import config, container_env, installed_plugin, prev_result, run
from conftest import publish_figures

pytestmark = pytest.mark.kernel

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    return installed_plugin(tmp_path_factory)


@pytest.fixture
def log(tmp_path):
    return str(tmp_path / "cni.log")


@pytest.fixture
def namespaces():
    made = []

    def make():
        name = f"icc{uuid.uuid4().hex[:8]}"
        pyr_netns.create(name)
        made.append(name)
        return f"/run/netns/{name}"
    yield make
    for name in made:
        pyr_netns.remove(name)


def enrolled_cookies():
    with Maps() as maps:
        return {k.value for k in maps.pods.keys()}


def assert_nothing_enrolled():
    assert enrolled_cookies() == set()
    assert podrecord.all_records() == {}
    assert paths.listdir(paths.PIN_PODS) == []


# --- VERSION and malformed requests (no kernel state needed) --------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_version(plugin, log, version):
    code, doc = run(plugin, log, "VERSION", {"cniVersion": version})
    assert code == 0
    assert doc == {"cniVersion": version, "supportedVersions": VERSIONS}


def test_version_without_stdin(plugin, log):
    code, doc = run(plugin, log, "VERSION")
    assert code == 0 and doc["supportedVersions"] == VERSIONS


@pytest.mark.parametrize("desc,command,stdin,env,code", [
    ("malformed JSON", "ADD", "{not json", {}, 6),
    ("not an object", "ADD", "[1, 2]", {}, 6),
    ("no cniVersion", "ADD", '{"name": "x"}', {}, 7),
    ("old version", "ADD", '{"cniVersion": "0.2.0"}', {}, 1),
    ("unknown future version", "ADD", '{"cniVersion": "9.9.9"}', {}, 1),
    ("CHECK before 0.4.0", "CHECK", '{"cniVersion": "0.3.1"}', {}, 1),
    ("GC before 1.1.0", "GC", '{"cniVersion": "1.0.0"}', {}, 1),
    ("STATUS before 1.1.0", "STATUS", '{"cniVersion": "1.0.0"}', {}, 1),
    ("unknown command", "FROB", '{"cniVersion": "1.0.0"}', {}, 4),
    ("no env at all", "ADD", '{"cniVersion": "1.0.0"}', {}, 4),
    ("bad container id", "ADD", '{"cniVersion": "1.0.0"}',
     {"CNI_CONTAINERID": "../x", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}, 4),
    ("relative netns", "ADD", '{"cniVersion": "1.0.0"}',
     {"CNI_CONTAINERID": "abc", "CNI_NETNS": "netns/x", "CNI_IFNAME": "eth0"}, 4),
    ("bad ifname", "ADD", '{"cniVersion": "1.0.0"}',
     {"CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "a/b"}, 4),
])
def test_malformed_requests(plugin, log, datapath, desc, command, stdin, env, code):
    rc, doc = run(plugin, log, command, stdin=stdin, **env)
    assert rc != 0, desc
    assert doc["code"] == code, (desc, doc)
    assert doc["msg"] and doc["cniVersion"] in VERSIONS
    assert_nothing_enrolled()


@pytest.mark.parametrize("desc,stdin", [
    ("invalid UTF-8", b'{"cniVersion": "1.0.0", "name": "\xff\xfe"}'),
    ("nested 100,000 deep", b'{"cniVersion": "1.0.0", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
])
def test_undecodable_requests_get_code_6_and_no_traceback(plugin, log, datapath, desc, stdin):
    env = {"CNI_COMMAND": "ADD", "PATH": os.environ["PATH"], "INTERCEPTOR_CNI_LOG": log,
           "INTERCEPTOR_PIN_ROOT": paths.PIN_ROOT, "INTERCEPTOR_RUN_DIR": paths.RUN_DIR}
    p = subprocess.run([plugin], input=stdin, env=env, capture_output=True, timeout=30)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["code"] == 6, (desc, doc)
    assert b"Traceback" not in p.stderr
    assert_nothing_enrolled()


def test_missing_env_names_the_variables(plugin, log, datapath):
    rc, doc = run(plugin, log, "ADD", config(), CNI_CONTAINERID="abc")
    assert doc["code"] == 4
    assert "CNI_IFNAME" in doc["msg"] and "CNI_NETNS" in doc["msg"]
    assert doc["cniVersion"] == "1.0.0"     # errors are encoded in the request's version


def test_logs_never_reach_stdout(plugin, log, datapath, namespaces):
    ns = namespaces()
    env = container_env(ns)
    p = subprocess.run([plugin], input=json.dumps(config()), capture_output=True, text=True,
                       env={"CNI_COMMAND": "ADD", "PATH": os.environ["PATH"], "INTERCEPTOR_CNI_LOG": log,
                            "INTERCEPTOR_PIN_ROOT": paths.PIN_ROOT,
                            "INTERCEPTOR_RUN_DIR": paths.RUN_DIR, **env})
    assert p.returncode == 0
    json.loads(p.stdout)                 # one document, nothing else
    assert "enrolled" in p.stderr
    assert "enrolled" in open(log).read()
    run(plugin, log, "DEL", config(), **env)


# --- ADD / DEL --------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_add_returns_prev_result_and_enrolls_then_del_removes(plugin, log, datapath, namespaces, version):
    ns = namespaces()
    env = container_env(ns)
    rc, doc = run(plugin, log, "ADD", config(version), **env)
    assert rc == 0, doc
    assert doc == prev_result(version)
    cookie = netns.cookie_of(ns)
    assert enrolled_cookies() == {cookie}
    rec = podrecord.read(cookie)
    assert (rec.container_id, rec.ifname, rec.netns, rec.pod) == (
        env["CNI_CONTAINERID"], "eth0", ns, "default/web")
    assert rec.addresses == ["10.66.0.5"]
    assert [e.piece for e in rec.journal] == pieces.for_plan(node_state.node_plan()) and rec.complete
    assert os.path.exists(paths.pod_link_pin(cookie, "sk_lookup"))
    with Maps() as maps:
        owner = maps.pod_addrs.get(abi.PodAddrKey(addr=addr16(ipaddress.ip_address("10.66.0.5"))))
        assert owner.value == cookie

    assert run(plugin, log, "DEL", config(version), **env) == (0, None)
    assert_nothing_enrolled()
    assert run(plugin, log, "DEL", config(version), **env) == (0, None)     # repeated DEL


def test_add_is_idempotent(plugin, log, datapath, namespaces):
    ns = namespaces()
    env = container_env(ns)
    assert run(plugin, log, "ADD", config(), **env)[0] == 0
    assert run(plugin, log, "ADD", config(), **env)[0] == 0
    assert len(enrolled_cookies()) == 1
    run(plugin, log, "DEL", config(), **env)
    assert_nothing_enrolled()


def test_unknown_config_fields_are_ignored(plugin, log, datapath, namespaces):
    ns = namespaces()
    env = container_env(ns)
    rc, doc = run(plugin, log, "ADD", config(somethingNew={"a": 1}, dns={}), **env)
    assert rc == 0, doc
    run(plugin, log, "DEL", config(), **env)


def test_add_without_prev_result_is_a_config_error(plugin, log, datapath, namespaces):
    rc, doc = run(plugin, log, "ADD", config(prev=False), **container_env(namespaces()))
    assert doc["code"] == 7 and "prevResult" in doc["msg"]
    assert_nothing_enrolled()


def test_add_for_a_missing_netns(plugin, log, datapath):
    rc, doc = run(plugin, log, "ADD", config(), **container_env("/run/netns/does-not-exist"))
    assert doc["code"] == 3
    assert_nothing_enrolled()


def test_del_without_netns_and_after_netns_is_gone(plugin, log, datapath):
    name = f"icc{uuid.uuid4().hex[:8]}"
    pyr_netns.create(name)
    env = container_env(f"/run/netns/{name}")
    assert run(plugin, log, "ADD", config(), **env)[0] == 0
    pyr_netns.remove(name)
    env["CNI_NETNS"] = ""                # runtimes may pass none once it is gone
    assert run(plugin, log, "DEL", config(prev=False), **env) == (0, None)
    assert_nothing_enrolled()


def test_del_of_an_unknown_container_succeeds(plugin, log, datapath):
    env = {"CNI_CONTAINERID": "never-added", "CNI_IFNAME": "eth0", "CNI_NETNS": ""}
    assert run(plugin, log, "DEL", config(prev=False), **env) == (0, None)


def test_add_when_datapath_not_loaded_asks_to_try_again(plugin, log, datapath, namespaces):
    loader.unload()
    try:
        rc, doc = run(plugin, log, "ADD", config(), **container_env(namespaces()))
        assert doc["code"] == 11 and "not loaded" in doc["msg"]
        assert podrecord.all_records() == {}
    finally:
        ensure.load(bypass=True)


# --- which pods -----------------------------------------------------------------------
ANN = "io.kubernetes.cri.pod-annotations"


@pytest.mark.parametrize("desc,args,cfg,enrolled", [
    ("kube-system excluded by default", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns", {}, False),
    ("namespace list from config", "K8S_POD_NAMESPACE=infra;K8S_POD_NAME=x",
     {"excludeNamespaces": ["infra"]}, False),
    ("inject=false", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=x",
     {"runtimeConfig": {ANN: {"sidecar.istio.io/inject": "false"}}}, False),
    ("marker required and missing", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=x",
     {"sidecarMarker": "sidecar.istio.io/status"}, False),
    ("marker required and present", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=x",
     {"sidecarMarker": "sidecar.istio.io/status",
      "runtimeConfig": {ANN: {"sidecar.istio.io/status": "{}"}}}, True),
    ("podman: no namespace", "K8S_POD_NAME=x", {}, True),
    ("no namespace, config says skip", "K8S_POD_NAME=x", {"enrollWithoutNamespace": False}, False),
])
def test_which_pods_are_enrolled(plugin, log, datapath, namespaces, desc, args, cfg, enrolled):
    ns = namespaces()
    env = container_env(ns, args=args)
    rc, doc = run(plugin, log, "ADD", config(**cfg), **env)
    assert rc == 0, doc
    assert doc == prev_result("1.0.0"), desc
    assert bool(enrolled_cookies()) == enrolled, desc
    assert run(plugin, log, "DEL", config(**cfg), **env) == (0, None)
    assert_nothing_enrolled()


def test_config_keys_and_annotations_set_the_pod(plugin, log, datapath, namespaces):
    ns = namespaces()
    env = container_env(ns)
    cfg = config(excludeOutboundPorts="22", noProxy="passthrough", runtimeConfig={ANN: {
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.0.2.0/24",
        "status.sidecar.istio.io/port": "15999",
        "interceptor.io/bypass": "false",
    }})
    assert run(plugin, log, "ADD", cfg, **env)[0] == 0
    cookie = netns.cookie_of(ns)
    s = podrecord.read(cookie).settings
    assert s.exclude_outbound_ports == [5432, 6379]        # annotation overrides config
    assert [str(n) for n in s.exclude_outbound_cidrs] == ["192.0.2.0/24"]
    assert 15999 in s.exclude_inbound_ports
    assert s.no_proxy == "passthrough" and s.bypass == ()
    with Maps() as maps:
        ports = {(k.kind, k.port) for k in maps.port_rules.keys() if k.netns_cookie == cookie}
        cfg_entry = maps.pods.get(ctypes.c_uint64(cookie))
    assert (abi.PortKind.OUT_EXCLUDE, 5432) in ports and (abi.PortKind.IN_EXCLUDE, 15999) in ports
    assert cfg_entry.flags & abi.POD_F_PASSTHROUGH and not cfg_entry.flags & abi.POD_F_BYPASS
    run(plugin, log, "DEL", cfg, **env)


@pytest.mark.parametrize("annotation,value", [
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/99"),
    ("traffic.sidecar.istio.io/includeInboundPorts", "http"),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "70000"),
    ("status.sidecar.istio.io/port", "x"),
    ("interceptor.io/bypass", "maybe"),
    ("interceptor.io/ingress-policy", "deny from nowhere"),
    ("interceptor.io/protected-ports", "15001,x"),
    ("interceptor.io/ingress-filter", "sometimes"),
])
def test_invalid_annotation_is_an_error_naming_it(plugin, log, datapath, namespaces, annotation, value):
    rc, doc = run(plugin, log, "ADD", config(runtimeConfig={ANN: {annotation: value}}),
                  **container_env(namespaces()))
    assert doc["code"] == 7
    assert annotation in doc["msg"]
    assert_nothing_enrolled()


def test_invalid_config_key_is_an_error_naming_it(plugin, log, datapath, namespaces):
    rc, doc = run(plugin, log, "ADD", config(outboundPort=0), **container_env(namespaces()))
    assert doc["code"] == 7 and "outboundPort" in doc["msg"]
    assert_nothing_enrolled()


# Any JSON value where a request has a field, a plugin key or an annotation.
HOSTILE = [None, True, False, 0, -1, 1.5, 2**70, "", "x", "garbage/99", "10.0.0.1/40", "*", [], [None],
           [[[]]], {}, {"a": [1]}, "a" * 10000, "\udcff", ["10.1.2.3/24"], [{"address": 5}],
           {"address": "1.2.3.4/24"}]
HOSTILE_KEYS = ["proxyUID", "outboundPort", "includeOutboundCIDRs", "excludeInboundPorts", "ingressPolicy",
                "bypass", "noProxy", "excludeNamespaces", "sidecarMarker", "enrollWithoutNamespace",
                "logFile", "pinRoot", "runDir", "cniVersion", "name", "type", "runtimeConfig", "prevResult"]
HOSTILE_ANNOTATIONS = ["traffic.sidecar.istio.io/excludeOutboundPorts", "interceptor.io/ingress-policy",
                       "interceptor.io/bypass", "status.sidecar.istio.io/port", "sidecar.istio.io/inject",
                       "traffic.sidecar.istio.io/includeOutboundIPRanges"]


def _fields(doc, path=()):
    """Every path into a JSON document."""
    if path:
        yield path
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _fields(value, path + (key,))


@pytest.mark.filterwarnings("error::DeprecationWarning")   # e.g. a bool taken as an address
def test_hostile_requests_get_a_spec_error_and_change_nothing(datapath, namespaces, monkeypatch, capfd,
                                                              tmp_path):
    """A valid ADD with one field, plugin key or annotation at a time replaced by each
    hostile JSON value (>1,000 requests): each answer is a success or the spec's error
    JSON with a code below 100 (never 999, an internal error), no traceback, and after
    DEL of each nothing is left."""
    from interceptor.cni import plugin as cni
    ns = namespaces()

    def valid():
        return config(runtimeConfig={ANN: {"sidecar.istio.io/status": "x"}})
    targets = list(_fields(valid())) + [(k,) for k in HOSTILE_KEYS] + \
        [("runtimeConfig", ANN, a) for a in HOSTILE_ANNOTATIONS]
    env = container_env(ns)
    monkeypatch.setenv("INTERCEPTOR_CNI_LOG", str(tmp_path / "cni.log"))   # not the corpus' logFile
    cwd_before = sorted(os.listdir("."))
    tried, answers = 0, {}
    for path in targets:
        for value in HOSTILE:
            doc = valid()
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
            text = json.dumps(doc)
            for command in ("ADD", "DEL"):
                with monkeypatch.context() as m:     # the plugin may set location variables
                    m.setattr(os, "environ", dict(os.environ))
                    code, out = cni.run(dict(env, CNI_COMMAND=command), text)
                tried += 1
                if code != 0:
                    assert set(out) >= {"cniVersion", "code", "msg"}, (path, value, out)
                    assert out["code"] < 100, (path, value, out)
                    answers[out["code"]] = answers.get(out["code"], 0) + 1
    assert tried > 1000
    assert sorted(os.listdir(".")) == cwd_before, "a relative logFile was written"
    assert "Traceback" not in capfd.readouterr().err
    assert_nothing_enrolled()
    print(f"{tried} requests; error codes: {sorted(answers.items())}")
    publish_figures({"scenario": "hostile CNI requests (every field of ADD/DEL, any JSON type)",
                     "tried": {"requests": tried, **{f"answered code {c}": n for c, n in sorted(answers.items())}},
                     "failures": 0, "leftovers": {}})


# --- CHECK, GC, STATUS ------------------------------------------------------------------
def test_check(plugin, log, datapath, namespaces):
    ns = namespaces()
    env = container_env(ns)
    assert run(plugin, log, "ADD", config(), **env)[0] == 0
    assert run(plugin, log, "CHECK", config(), **env) == (0, None)
    cookie = netns.cookie_of(ns)
    # the runtime names another namespace than the one enrolled
    rc, doc = run(plugin, log, "CHECK", config(), **dict(env, CNI_NETNS=namespaces()))
    assert doc["code"] == 103 and "not the enrolled one" in doc["msg"]
    # a record an ADD killed half-way leaves (written first, completed last)
    rec = store.read_json(paths.pod_state_file(cookie))
    store.write_json(paths.pod_state_file(cookie), dict(rec, complete=False))
    rc, doc = run(plugin, log, "CHECK", config(), **env)
    assert doc["code"] == 106 and "incomplete" in doc["msg"]
    from interceptor.ops import status
    assert any("enrollment incomplete" in e for e in status.collect()["errors"])
    store.write_json(paths.pod_state_file(cookie), rec)
    assert run(plugin, log, "CHECK", config(), **env) == (0, None)
    # break the inbound attachment behind the plugin's back
    libbpf.detach_link_pin(paths.pod_link_pin(cookie, "sk_lookup"))
    rc, doc = run(plugin, log, "CHECK", config(), **env)
    assert doc["code"] == 102 and "sk_lookup" in doc["msg"]
    with Maps() as maps:
        maps.pods.delete(ctypes.c_uint64(cookie))
    rc, doc = run(plugin, log, "CHECK", config(), **env)
    assert doc["code"] == 101
    run(plugin, log, "DEL", config(), **env)
    rc, doc = run(plugin, log, "CHECK", config(), **env)
    assert doc["code"] == 100


def test_ingress_filter_from_config_and_annotation_and_its_check(plugin, log, datapath, namespaces):
    ns = namespaces()
    name = os.path.basename(ns)
    subprocess.run(["ip", "link", "add", f"v{name[-12:]}", "type", "veth", "peer", "name", "eth0",
                    "netns", name], check=True)
    env = container_env(ns)
    cfg = config(ingressPolicy=["deny from 192.0.2.0/24"], protectedPorts=[9901], runtimeConfig={
        ANN: {"interceptor.io/ingress-policy": "allow tcp port 8080; deny udp port 53"}})
    assert run(plugin, log, "ADD", cfg, **env)[0] == 0
    cookie = netns.cookie_of(ns)
    rec = podrecord.read(cookie)
    assert [ingress_policy.rule_text(r) for r in rec.settings.ingress_policy] == \
        ["allow tcp port 8080", "deny udp port 53"]             # annotation overrides config
    assert rec.settings.protected_ports == [9901]
    interfaces = rec.entry("filter-xdp").state["interfaces"]
    assert [a["ifname"] for a in interfaces] == ["eth0"]
    assert run(plugin, log, "CHECK", cfg, **env) == (0, None)
    # take the filter (tc, on this veth) off behind the plugin's back
    assert interfaces[0]["mode"] == "tc"
    with netns.entered(ns):
        tc.delete_filter(interfaces[0]["ifindex"])
    rc, doc = run(plugin, log, "CHECK", cfg, **env)
    assert doc["code"] == 105 and "ingress filter" in doc["msg"]
    assert run(plugin, log, "DEL", cfg, **env)[0] == 0
    assert_nothing_enrolled()


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_removes_attachments_not_listed(plugin, log, datapath, namespaces, key):
    envs = [container_env(namespaces()) for _ in range(3)]
    for i, env in enumerate(envs):
        assert run(plugin, log, "ADD", config(ip=f"10.66.1.{i + 2}"), **env)[0] == 0
    keep = [{"containerID": envs[0]["CNI_CONTAINERID"], "ifname": "eth0"}]
    assert run(plugin, log, "GC", {"cniVersion": "1.1.0", "name": "test", key: keep}) == (0, None)
    records = podrecord.all_records().values()
    assert [r.container_id for r in records] == [envs[0]["CNI_CONTAINERID"]]
    assert len(enrolled_cookies()) == 1
    run(plugin, log, "DEL", config(), **envs[0])
    assert_nothing_enrolled()


def test_status(plugin, log, datapath):
    assert run(plugin, log, "STATUS", {"cniVersion": "1.1.0", "name": "test"}) == (0, None)
    loader.unload()
    try:
        rc, doc = run(plugin, log, "STATUS", {"cniVersion": "1.1.0", "name": "test"})
        assert doc["code"] == 50
    finally:
        ensure.load(bypass=True)


# --- concurrency ------------------------------------------------------------------------
def test_concurrent_add_and_del(plugin, log, datapath, namespaces):
    envs = [container_env(namespaces()) for _ in range(12)]

    def add(i_env):
        i, env = i_env
        return run(plugin, log, "ADD", config(ip=f"10.66.2.{i + 2}"), **env)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(add, enumerate(envs)))
    assert all(rc == 0 for rc, _ in results), results
    assert len(enrolled_cookies()) == 12
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda env: run(plugin, log, "DEL", config(), **env), envs))
    assert all(r == (0, None) for r in results), results
    assert_nothing_enrolled()


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_add_check_del_on_rules(plugin, log, namespaces, mode):
    """The same plugin behaviour when the node runs on REDIRECT rules."""
    loader.unload()
    ensure.load(mode=mode)
    try:
        ns = namespaces()
        env = container_env(ns)
        rc, doc = run(plugin, log, "ADD", config(), **env)
        assert rc == 0 and doc == prev_result("1.0.0")
        rec = podrecord.read(netns.cookie_of(ns))
        assert rec.mode == {"outbound": "rules", "inbound": "rules"}
        applied = rec.entry("capture-rules").state
        backend = rules.backend_named(applied["backend"])
        assert backend.present(ns)
        assert run(plugin, log, "CHECK", config(), **env) == (0, None)
        backend.remove(ns, applied.get("created"))          # behind the plugin's back
        rc, doc = run(plugin, log, "CHECK", config(), **env)
        assert doc["code"] == 104 and "rules missing" in doc["msg"]
        rc, doc = run(plugin, log, "ADD", config(noProxy="passthrough"), **env)
        assert doc["code"] == 7 and "passthrough" in doc["msg"]
        assert run(plugin, log, "DEL", config(), **env) == (0, None)
        assert podrecord.all_records() == {}
        assert not backend.present(ns)
    finally:
        loader.unload()
        ensure.load(bypass=True)       # back to the module's datapath
