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

from interceptor import counters, lab as labmod, netns, paths, podrecord
from interceptor.maps import Maps

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


def test_container_is_intercepted_and_removed_cleanly(podman, tmp_path):
    d = podman["dirs"]
    interceptor_cli("cni", "install", "--bin-dir", str(d["bin"]), "--conf-dir", str(d["conf"]))
    # Point the chained entry at the tests' pins and log: podman runs DEL from its cleanup
    # process, which does not carry the test's environment.
    conf_path = d["conf"] / f"10-{podman['net']}.conflist"
    doc = json.loads(conf_path.read_text())
    doc["plugins"][-1].update(pinRoot=paths.PIN_ROOT, runDir=paths.RUN_DIR,
                              logFile=str(podman["log"]))
    conf_path.write_text(json.dumps(doc))

    name = f"ic{uuid.uuid4().hex[:8]}"
    podman["containers"].append(name)
    podman["podman"]("run", "-d", "--name", name, "--network", podman["net"],
                     "--rootfs", str(d["rootfs"]), "/bin/sleep", "600")
    info = json.loads(podman["podman"]("inspect", name).stdout)[0]
    sandbox = info["NetworkSettings"]["SandboxKey"]
    container_id = info["Id"]
    cookie = netns.cookie_of(sandbox)
    rec = podrecord.read(cookie)
    assert rec.container_id == container_id and rec.netns == sandbox
    pod_ip = rec.addresses[0]
    assert pod_ip.startswith(SUBNET + ".")

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

    podman["podman"]("rm", "-f", "-t", "0", name)
    podman["containers"].remove(name)
    cni_log = podman["log"].read_text()
    assert f"ADD {container_id}: enrolled" in cni_log
    assert f"DEL {container_id}: removed 1" in cni_log
    assert podrecord.all_records() == {}
    assert not os.path.exists(paths.pod_pin_dir(cookie))
    with Maps() as maps:
        assert maps.pods.keys() == []
        assert [k for k, v in maps.pod_addrs.items() if v.value == cookie] == []
        assert [k for k in maps.port_rules.keys() if k.netns_cookie == cookie] == []
        assert maps.xdp_pods.keys() == []

    interceptor_cli("cni", "uninstall", "--bin-dir", str(d["bin"]), "--conf-dir", str(d["conf"]))
    # (libcni leaves its own cni.lock beside the configuration)
    conf_files = sorted(n for n in os.listdir(d["conf"]) if n != "cni.lock")
    assert conf_files == [f"10-{podman['net']}.conflist"]
    assert json.loads((d["conf"] / conf_files[0]).read_text()) == json.loads(podman["original_conf"])
    assert not (d["bin"] / "interceptor-cni").exists()
