"""`interceptor status` and the Prometheus metrics against real traffic: they must show
exactly the connections that exist, with their original destinations, and report a
broken pod as an error."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import SERVER_PORT, enroll, start_server
from interceptor import paths
from interceptor.kernel import libbpf, netns

pytestmark = pytest.mark.kernel

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "status.txt")
GOLDEN_REPORT = os.path.join(os.path.dirname(__file__), "golden", "status-report.json")
HOLD = ("import socket,sys,time\n"
        "s=socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "s.sendall(b'held'); print('connected', flush=True); time.sleep(120)\n")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "interceptor.cli", *args], capture_output=True,
                          text=True, timeout=60)


def status_json(*args):
    r = cli("status", "-o", "json", *args)
    return r.returncode, json.loads(r.stdout)


def wait_for(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture
def held(datapath, lab):
    """Pods a and b with HAProxy sidecars, both enrolled, and one connection from a's app
    to b's app held open through both sidecars."""
    a = lab.add_pod("a")
    b = lab.add_pod("b")
    start_server(b)
    lab.start_haproxy(a)
    lab.start_haproxy(b)
    enroll(a)
    enroll(b)
    holder = a.spawn(sys.executable, "-c", HOLD, str(b.ipv4), str(SERVER_PORT),
                     stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "connected"
    return lab, a, b, holder


def test_status_json_shows_exactly_the_live_connections(held):
    lab, a, b, holder = held
    rc, report = status_json()
    assert rc == 0, report["errors"]
    rows = wait_for(lambda: [s for s in status_json()[1]["sockets"]], 3)
    by_dir = {s["direction"]: s for s in rows}
    assert sorted(by_dir) == ["inbound", "outbound"] and len(rows) == 2
    out, inb = by_dir["outbound"], by_dir["inbound"]
    assert (out["pod"], out["original_dst"], out["proxy_port"]) == ("test/a", f"{b.ipv4}:{SERVER_PORT}", 15001)
    assert out["source"].startswith("127.0.0.1:")
    assert (inb["pod"], inb["original_dst"], inb["proxy_port"]) == ("test/b", f"{b.ipv4}:{SERVER_PORT}", 15006)
    assert inb["source"].startswith(f"{a.ipv4}:")          # a's sidecar, connecting out
    assert out["bypassed"] and inb["bypassed"]
    pods = {p["pod"]: p for p in report["pods"]}
    assert pods["test/a"]["live"] == {"outbound": 1, "inbound": 0}
    assert pods["test/b"]["live"] == {"outbound": 0, "inbound": 1}
    assert pods["test/a"]["proxy_listening"] == {"outbound": True, "inbound": True}
    assert pods["test/a"]["addresses"] == [str(a.ipv4), str(a.ipv6)]

    # --pod filters pods and sockets alike
    rc, only_b = status_json("--pod", "test/b")
    assert [p["pod"] for p in only_b["pods"]] == ["test/b"]
    assert [s["direction"] for s in only_b["sockets"]] == ["inbound"]

    # closed connections disappear
    holder.terminate()
    holder.wait()
    assert wait_for(lambda: status_json()[1]["sockets"] == [], 5)


def test_sockets_subcommand(held):
    r = cli("status", "sockets")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["POD", "DIR", "SOURCE", "ORIGINAL", "DST", "PROXY", "BYP", "AGE"]
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) == 3
    r = cli("status", "sockets", "-o", "json")
    assert {s["direction"] for s in json.loads(r.stdout)} == {"outbound", "inbound"}


def mask(text):
    text = re.sub(r"(Kernel:\s+)\S+", r"\1<kernel>", text)
    text = re.sub(r"(Cgroup:\s+)\S+", r"\1<cgroup>", text)
    text = re.sub(r"(Maps:\s+).*", r"\1<maps>", text)
    text = re.sub(r"datapath [0-9a-f]{12}", "datapath <version>", text)
    text = re.sub(r"(127\.0\.0\.1|10\.77\.0\.\d+):\d{5}(?=\s)", r"\1:<port>", text)
    # the borrowed-headers warning depends on the machine, not on interceptor
    text = re.sub(r"  - headers belong to another kernel.*?datapath\n", "", text, flags=re.S)
    text = re.sub(r"\n\nWarnings:\n*$", "\n", text)
    text = re.sub(r"\d+[smh]$", "<age>", text, flags=re.M)
    return text


def test_status_text_is_stable(held):
    r = cli("status")
    assert r.returncode == 0
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    got = mask(r.stdout)
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            f.write(got)
        # and the report it came from: tests/test_renderers.py renders it without root
        report = json.loads(cli("status", "-o", "json").stdout)
        with open(GOLDEN_REPORT, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        assert got == f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    from prometheus_client.parser import text_string_to_metric_families
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture
def metrics_server(datapath):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "interceptor.cli", "metrics", "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    assert "serving metrics" in proc.stdout.readline()
    yield port
    proc.terminate()
    proc.wait()


def test_metrics_count_the_connections(held, metrics_server):
    lab, a, b, holder = held
    m = scrape(metrics_server)
    assert m[("interceptor_datapath_loaded", ())] == 1
    assert m[("interceptor_pods_enrolled", ())] == 2
    key = ("interceptor_redirected_connections_total",
           (("direction", "outbound"), ("pod", "test/a")))
    assert m[key] == 1
    assert m[("interceptor_redirected_connections_total",
              (("direction", "inbound"), ("pod", "test/b")))] == 1
    assert m[("interceptor_original_dst_answers_total",
              (("pod", "test/a"), ("result", "answered")))] >= 1
    assert m[("interceptor_bypass_bytes_total", (("pod", "test/a"), ("result", "redirected")))] >= 4
    assert m[("interceptor_map_capacity", (("map", "pods"),))] == 4096
    assert m[("interceptor_map_entries", (("map", "pods"),))] == 2
    assert m[("interceptor_operations_total", (("operation", "enroll"), ("result", "ok")))] >= 2


def test_cni_durations_are_a_histogram(datapath, metrics_server, tmp_path):
    from interceptor.ops import opstats
    opstats.record("cni ADD", True, 0.02)
    m = scrape(metrics_server)
    assert m[("interceptor_cni_command_duration_seconds_bucket", (("command", "ADD"), ("le", "0.025")))] >= 1
    assert m[("interceptor_cni_command_duration_seconds_count", (("command", "ADD"),))] >= 1


def test_broken_attachment_makes_status_fail(datapath, lab):
    a = lab.add_pod("a")
    enroll(a)
    assert cli("status").returncode == 0
    cookie = netns.cookie_of(a.netns_path)
    libbpf.detach_link_pin(paths.pod_link_pin(cookie, "sk_lookup"))   # behind the loader's back
    r = cli("status")
    assert r.returncode == 1
    assert "Errors:" in r.stdout and "test/a: inbound sk_lookup link missing" in r.stdout
    rc, report = status_json()
    assert rc == 1 and report["pods"][0]["problems"] == ["inbound sk_lookup link missing"]


def test_status_enters_each_pods_namespace_once(held, monkeypatch):
    """Everything `status` asks of a pod's namespace (each piece's check: ::6 on lo, the
    filter on each interface; the proxy's listeners) is asked in one visit."""
    from interceptor.kernel import netns
    from interceptor.ops import status
    entries = []
    real = netns._setns
    monkeypatch.setattr(netns, "_setns", lambda fd: (entries.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    report = status.collect()
    assert len(report["pods"]) == 2 and not report["errors"], report["errors"]
    print(f"setns calls for 2 pods: {len(entries)}")
    assert len(entries) == 2 * 2, entries       # into each pod's namespace and back out, once
