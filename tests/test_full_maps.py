"""Full maps, made small with `--map-size`: what the next pod, policy or connection gets.
Nothing is ever half-applied or sent to the wrong place: a pod that does not fit is
refused whole (CNI code 11: the runtime retries, the pod does not start uncaptured), a
policy that does not fit leaves the previous one in force, and a connection beyond the
original-destination map's capacity still reaches its proxy with its destination."""
import ctypes
import json
import subprocess
import sys

import pytest

from cnihelper import config, installed_plugin, run
from conftest import enroll, loaded, pod_counters, sidecar_entries, start_server, start_sidecar
from interceptor import paths
from interceptor.kernel import netns
from interceptor.pod import podrecord
from interceptor.datapath.maps import Maps, addr16
from interceptor.ops import enrollment, status

pytestmark = pytest.mark.kernel

HOLD = """
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, peers = [], []
for _ in range(n):                       # all open at once
    s = socket.create_connection((host, port), timeout=10)
    peers.append(s.getpeername()[0])
    held.append(s)
replies = 0
for s in held:
    s.sendall(b"hello"); s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    replies += json.loads(data)["bytes"] == 5
    s.close()
print(json.dumps({"peers": peers, "replies": replies}))
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    return installed_plugin(tmp_path_factory)


def cni_add(plugin, log, pod, cid):
    env = {"CNI_CONTAINERID": cid, "CNI_NETNS": pod.netns_path, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": f"K8S_POD_NAMESPACE=full;K8S_POD_NAME={pod.name}"}
    return run(plugin, log, "ADD", config(ip=str(pod.ipv4)), **env), env


def test_a_pod_that_does_not_fit_is_refused_whole_and_fits_once_one_goes(lab, plugin, tmp_path):
    log = str(tmp_path / "cni.log")
    with loaded(map_sizes={"pods": 2}):
        a, b, c = (lab.add_pod(n) for n in "abc")
        for pod in (a, b):
            assert cni_add(plugin, log, pod, f"full-{pod.name}")[0][0] == 0
        (rc, doc), env_c = cni_add(plugin, log, c, "full-c")
        assert rc == 1 and doc["code"] == 11, doc
        assert "map pods is full (2 entries)" in doc["msg"] and "--map-size pods=" in doc["msg"], doc
        cookie = netns.cookie_of(c.netns_path)
        assert podrecord.read(cookie) is None and not paths.listdir(paths.pod_pin_dir(cookie))
        with Maps() as maps:
            assert maps.pod_addrs.get(addr16(c.ipv4)) is None
            assert maps.xdp_pods.get(ctypes.c_uint64(cookie)) is None
        assert "xdp" not in subprocess.run(["ip", "-n", c.netns, "link", "show", "eth0"],
                                           capture_output=True, text=True).stdout
        assert "clsact" not in subprocess.run(["ip", "netns", "exec", c.netns, "tc", "qdisc", "show",
                                               "dev", "eth0"], capture_output=True, text=True).stdout
        for pod in (a, b):
            rec = podrecord.read(netns.cookie_of(pod.netns_path))
            assert not enrollment.verify(rec, pod.netns_path)
        assert "map pods is 2/2 full" in status.collect()["warnings"]
        # one pod goes: the runtime's retry of the refused ADD succeeds
        assert run(plugin, log, "DEL", config(), **{"CNI_CONTAINERID": "full-a", "CNI_NETNS": a.netns_path,
                                                      "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"})[0] == 0
        assert run(plugin, log, "ADD", config(ip=str(c.ipv4)), **env_c)[0] == 0
        assert not enrollment.verify(podrecord.read(cookie), c.netns_path)


def test_a_policy_that_does_not_fit_leaves_the_previous_one_in_force(lab):
    with loaded(map_sizes={"ingress_rules": 4}):
        a = lab.add_pod("a")
        enroll(a, ingress_policy=["deny tcp port 22"])
        cookie = netns.cookie_of(a.netns_path)
        with Maps() as maps:
            before = sorted(bytes(k) for k in maps.ingress_rules.pod_keys(cookie))
        rules = [f"deny tcp port {p}" for p in range(1000, 1010)]
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "policy", "set", "--cookie", str(cookie),
                            *rules], capture_output=True, text=True)
        assert r.returncode == 1 and "map ingress_rules is full" in r.stderr, r.stderr
        assert "previous one stays" in r.stderr and "Traceback" not in r.stderr
        with Maps() as maps:
            assert sorted(bytes(k) for k in maps.ingress_rules.pod_keys(cookie)) == before
        rec = podrecord.read(cookie)
        assert [str(r) for r in rec.settings.ingress_policy] and not enrollment.verify(rec, a.netns_path)
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "policy", "list", "--cookie", str(cookie),
                            "-o", "json"], capture_output=True, text=True)
        assert json.loads(r.stdout)[0]["rules"] == ["deny tcp port 22"]


def test_connections_beyond_the_original_destination_map_still_reach_their_proxy(lab):
    """redirected is an LRU map: when it is full the oldest record goes, which the proxy
    has already read (it reads at accept), so every new connection keeps its original
    destination. What an evicted connection loses is its restored peer name."""
    with loaded(map_sizes={"redirected": 8}):
        a, b = lab.add_pod("a"), lab.add_pod("b")
        start_server(b)
        log = start_sidecar(lab, a)
        enroll(a)
        n = 30
        out = json.loads(a.run(sys.executable, "-c", HOLD, str(b.ipv4), "8080", str(n), timeout=60).stdout)
        assert out["replies"] == n and out["peers"] == [str(b.ipv4)] * n, out
        entries = sidecar_entries(log)
        assert len(entries) == n and all(e["orig_dst"] == f"{b.ipv4}:8080" for e in entries), entries[-3:]
        counts = pod_counters(a)
        assert counts.get("orig_dst_record_failed", 0) == 0 and counts["out_redirected"] == n
        with Maps() as maps:
            assert len(maps.redirected.keys()) <= 8
