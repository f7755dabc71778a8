"""End to end with a real container runtime: podman's CNI backend runs bridge +
host-local + interceptor-cni from a conflist that `interceptor cni install` chained.
The container's app is intercepted by a HAProxy sidecar in the container's netns, and
after `podman rm` nothing of the pod remains."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from conftest import start_http_app
from interceptor import abi, paths
from interceptor.kernel import netns
from interceptor.pod import podrecord
from interceptor.datapath.maps import Maps
from interceptor.ops import counters
from interceptor.harness import lab as labmod

pytestmark = pytest.mark.kernel

SUBNET = "10.89.77"


@pytest.fixture
def podman(datapath, tmp_path):
    if not shutil.which("podman"):
        pytest.fail("podman is not installed (make setup installs it)")
    tag = uuid.uuid4().hex[:6]
    net, bridge = f"ictest{tag}", f"icbr{tag}"
    dirs = {name: tmp_path / name for name in ("bin", "conf", "rootfs", "ipam")}
    short = pathlib.Path(tempfile.mkdtemp(prefix="icp", dir="/tmp"))   # podman: runroot <= 50 chars
    dirs.update(root=short / "root", runroot=short / "run")
    for d in dirs.values():
        d.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        os.symlink(f"/usr/lib/cni/{plugin}", dirs["bin"] / plugin)
    (dirs["rootfs"] / "bin").mkdir()
    shutil.copy("/bin/busybox", dirs["rootfs"] / "bin" / "busybox")
    for applet in ("sh", "sleep", "wget"):
        os.symlink("busybox", dirs["rootfs"] / "bin" / applet)
    conflist = {"cniVersion": "1.0.0", "name": net, "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{SUBNET}.0/24"}]],
                 "dataDir": str(dirs["ipam"])}}]}
    (dirs["conf"] / f"10-{net}.conflist").write_text(json.dumps(conflist, indent=2))
    original_conf = (dirs["conf"] / f"10-{net}.conflist").read_text()
    conf = tmp_path / "containers.conf"
    # the engine settings this machine kind needs, then this test's own (still [engine])
    engine = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "podman-engine.conf"
    conf.write_text(engine.read_text() + textwrap.dedent(f"""\
        events_logfile_path = "{tmp_path}/events.log"
        [network]
        network_backend = "cni"
        cni_plugin_dirs = ["{dirs['bin']}"]
        network_config_dir = "{dirs['conf']}"
        """))
    # the chained entry's logFile (podman's cleanup process runs DEL without our
    # environment): the plugin takes one only under /var/log
    log = pathlib.Path(f"/var/log/interceptor-cni-test-{uuid.uuid4().hex[:8]}.log")
    env = dict(os.environ, CONTAINERS_CONF=str(conf), INTERCEPTOR_CNI_LOG=str(log))
    ip_forward = open("/proc/sys/net/ipv4/ip_forward").read()

    def podman_cmd(*args, check=True):
        p = subprocess.run(["podman", "--root", str(dirs["root"]), "--runroot", str(dirs["runroot"]),
                            *args], env=env, capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {p.returncode}: {p.stderr}")
        return p

    ctx = {"net": net, "bridge": bridge, "dirs": dirs, "podman": podman_cmd, "log": log,
           "env": env, "original_conf": original_conf, "containers": []}
    yield ctx
    for name in ctx["containers"]:
        podman_cmd("rm", "-f", "-t", "0", name, check=False)
    log.unlink(missing_ok=True)
    subprocess.run(["umount", "-R", str(short)], capture_output=True)   # podman's storage mounts
    shutil.rmtree(short, ignore_errors=True)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write(ip_forward)
    for cache in ("/var/lib/cni/results", "/var/lib/cni/networks"):
        if os.path.isdir(cache):
            for name in os.listdir(cache):
                if name.startswith(net):
                    path = os.path.join(cache, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def interceptor_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "interceptor.cli", *args], capture_output=True,
                          text=True, env=env, check=True)


def install_chain(podman):
    """`interceptor cni install` into the test's conflist, the chained entry pointed at
    the tests' pins and log: podman runs DEL from its cleanup process, which does not
    carry the test's environment."""
    d = podman["dirs"]
    interceptor_cli("cni", "install", "--bin-dir", str(d["bin"]), "--conf-dir", str(d["conf"]))
    conf_path = d["conf"] / f"10-{podman['net']}.conflist"
    doc = json.loads(conf_path.read_text())
    doc["plugins"][-1].update(pinRoot=paths.PIN_ROOT, runDir=paths.RUN_DIR,
                              logFile=str(podman["log"]))
    conf_path.write_text(json.dumps(doc))


def run_container(podman):
    """A container on the test's network: (its id, its sandbox's netns path, its record)."""
    name = f"ic{uuid.uuid4().hex[:8]}"
    podman["containers"].append(name)
    podman["podman"]("run", "-d", "--name", name, "--network", podman["net"],
                     "--rootfs", str(podman["dirs"]["rootfs"]), "/bin/sleep", "600")
    info = json.loads(podman["podman"]("inspect", name).stdout)[0]
    sandbox = info["NetworkSettings"]["SandboxKey"]
    rec = podrecord.read(netns.cookie_of(sandbox))
    assert rec.container_id == info["Id"] and rec.netns == sandbox
    assert rec.addresses[0].startswith(SUBNET + ".")
    return name, sandbox, rec


def remove_container(podman, name):
    podman["podman"]("rm", "-f", "-t", "0", name)
    podman["containers"].remove(name)


def assert_nothing_of_the_pods_remains(podman, records):
    cni_log = podman["log"].read_text()
    for rec in records:
        assert f"ADD {rec.container_id}: enrolled" in cni_log
        assert f"DEL {rec.container_id}: removed" in cni_log
        assert not os.path.exists(paths.pod_pin_dir(rec.cookie))
    assert podrecord.all_records() == {}
    cookies = {rec.cookie for rec in records}
    with Maps() as maps:
        assert maps.pods.keys() == []
        assert [k for k, v in maps.pod_addrs.items() if v.value in cookies] == []
        assert [k for k in maps.port_rules.keys() if k.netns_cookie in cookies] == []
        assert maps.xdp_pods.keys() == []


def assert_chain_uninstalled(podman):
    d = podman["dirs"]
    interceptor_cli("cni", "uninstall", "--bin-dir", str(d["bin"]), "--conf-dir", str(d["conf"]))
    # (libcni leaves its own cni.lock beside the configuration)
    conf_files = sorted(n for n in os.listdir(d["conf"]) if n != "cni.lock")
    assert conf_files == [f"10-{podman['net']}.conflist"]
    assert json.loads((d["conf"] / conf_files[0]).read_text()) == json.loads(podman["original_conf"])
    assert not (d["bin"] / "interceptor-cni").exists()


def test_container_is_intercepted_and_removed_cleanly(podman, tmp_path):
    install_chain(podman)
    name, sandbox, rec = run_container(podman)
    cookie, pod_ip = rec.cookie, rec.addresses[0]

    # the sidecar: HAProxy in the container's network namespace, as uid 1337
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(labmod.HAPROXY_CONFIG.format(uid=1337, gid=1337, outbound_port=15001,
                                                inbound_port=15006))
    hlog = open(tmp_path / "haproxy.log", "w")
    haproxy = subprocess.Popen(["nsenter", f"--net={sandbox}", "haproxy", "-db", "-f", str(cfg)],
                               stdout=hlog, stderr=subprocess.STDOUT)
    # a server outside the pod: on the bridge's gateway address, in the host namespace
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", f"{SUBNET}.1", "18080"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        labmod.wait_listening(sandbox, 15001)
        labmod.wait_listening(sandbox, 15006)
        for _ in range(50):
            if subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{SUBNET}.1:18080/"]).returncode == 0:
                break
            time.sleep(0.1)
        out = podman["podman"]("exec", name, "wget", "-q", "-O", "-", f"http://{SUBNET}.1:18080/")
        assert "Directory listing" in out.stdout
        time.sleep(0.3)
        hlog.flush()
        log_text = open(tmp_path / "haproxy.log").read()
        assert "frontend=outbound client=127.0.0.1:" in log_text
        assert f"dst={SUBNET}.1:18080" in log_text, log_text
        # the ingress filter on the container's eth0: its proxy's capture port is not
        # reachable from outside, and the drop is counted
        assert [a["ifname"] for a in rec.entry("filter-xdp").state["interfaces"]] == ["eth0"]
        probe = subprocess.run(["curl", "-s", "-m", "2", f"http://{pod_ip}:15001/"])
        assert probe.returncode != 0
        with Maps() as maps:
            dropped = counters.from_maps(maps)[cookie].get("ingress_dropped_protected_port", {})
        assert dropped.get("count", 0) >= 1
    finally:
        labmod.stop_process(haproxy)
        labmod.stop_process(server)
        hlog.close()

    remove_container(podman, name)
    assert_nothing_of_the_pods_remains(podman, [rec])
    assert_chain_uninstalled(podman)


def test_envoy_sidecars_carry_calls_between_containers_and_from_outside(podman):
    """Two containers with Envoy as Istio configures their sidecars (envoy_sidecar): a
    call from one to the other's Service goes out through the caller's per-port
    listener and in through the callee's inbound chain, a call to a server outside
    the mesh through PassthroughCluster, and a call from the host into the callee's
    inbound chain; Envoy's own counters say which path each took."""
    from interceptor.harness import envoy_sidecar
    install_chain(podman)
    web_name, web_ns, web = run_container(podman)
    caller_name, caller_ns, caller = run_container(podman)
    web_ip, port = web.addresses[0], 8080
    service = envoy_sidecar.Service("web", port, [web_ip])
    envoy_dir = tempfile.mkdtemp(prefix="icenvoy", dir="/tmp")    # readable by the proxy's uid
    procs = []
    try:
        procs.append(start_http_app(port, web_ns))           # the web container's app
        procs.append(start_http_app(18080))                  # outside the mesh, on the host
        for name, sandbox, shape in ((web_name, web_ns, dict(app_ports=[port])),
                                     (caller_name, caller_ns, dict(services=[service]))):
            proc, _ = envoy_sidecar.start(sandbox, envoy_dir, name, families=(4,), **shape)
            procs.append(proc)
        before = {ns: envoy_sidecar.stats(ns) for ns in (web_ns, caller_ns)}

        # container to container, by the Service's per-port listener and the inbound chain
        out = podman["podman"]("exec", caller_name, "wget", "-q", "-O", "-", f"http://{web_ip}:{port}/")
        seen = json.loads(out.stdout)
        assert seen["sockname"] == f"{web_ip}:{port}"
        assert seen["peername"].startswith(f"{abi.INBOUND_SOURCE_V4}:"), seen   # Istio's inbound hop
        # to a server outside the mesh, by passthrough
        out = podman["podman"]("exec", caller_name, "wget", "-q", "-O", "-", f"http://{SUBNET}.1:18080/")
        assert json.loads(out.stdout)["sockname"] == f"{SUBNET}.1:18080"
        # from the host (outside the mesh) into the container's inbound chain
        from_host = subprocess.run(["curl", "-sf", "-m", "5", f"http://{web_ip}:{port}/"],
                                   capture_output=True, text=True)
        assert from_host.returncode == 0 and json.loads(from_host.stdout)["peername"].startswith(
            f"{abi.INBOUND_SOURCE_V4}:")

        caller_saw = envoy_sidecar.diff(envoy_sidecar.stats(caller_ns), before[caller_ns])
        web_saw = envoy_sidecar.diff(envoy_sidecar.stats(web_ns), before[web_ns])
        assert caller_saw.get(envoy_sidecar.requests_stat("outbound", port)) == 1, caller_saw
        assert caller_saw.get(envoy_sidecar.cluster_stat(service.cluster, "upstream_rq_total")) == 1, caller_saw
        assert caller_saw.get(envoy_sidecar.cluster_stat(envoy_sidecar.PASSTHROUGH, "upstream_cx_total")) == 1
        assert web_saw.get(envoy_sidecar.requests_stat("inbound", port)) == 2, web_saw
        assert web_saw.get(envoy_sidecar.cluster_stat(envoy_sidecar.inbound_cluster(port),
                                                      "upstream_rq_total")) == 2, web_saw
    finally:
        for proc in procs:
            labmod.stop_process(proc)
        shutil.rmtree(envoy_dir, ignore_errors=True)

    for name in (web_name, caller_name):
        remove_container(podman, name)
    assert_nothing_of_the_pods_remains(podman, [web, caller])
    assert_chain_uninstalled(podman)
