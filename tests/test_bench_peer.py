"""`bench --serve` / `bench xnode --peer` across two "machines": two network namespaces
joined by a link stand in for the two VMs, each role running in its own with a datapath
instance of its own, as the Vagrant set-up would. Numbers are not judged; the run must
complete, hold both sides' environment and CPU, and leave nothing behind on either side."""
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.kernel

LINK = ("192.168.123.1", "192.168.123.2")


def _sh(*argv):
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def two_machines():
    tag = uuid.uuid4().hex[:4]
    names = [f"icvm1{tag}", f"icvm2{tag}"]
    try:
        for name in names:
            _sh("ip", "netns", "add", name)
            _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "-n", names[0], "link", "add", "wire", "type", "veth", "peer", "name", "wire",
            "netns", names[1])
        for name, addr in zip(names, LINK, strict=True):
            _sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "wire")
            _sh("ip", "-n", name, "link", "set", "wire", "up")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _env(name):
    return dict(os.environ, INTERCEPTOR_PIN_ROOT=f"/sys/fs/bpf/interceptor-test-{name}",
                INTERCEPTOR_RUN_DIR=f"/run/interceptor-test-{name}")


def _netns_names():
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_cross_machine_run_holds_both_sides_and_leaves_nothing(two_machines, tmp_path):
    vm1, vm2 = two_machines
    before = _netns_names()
    server = subprocess.Popen(
        ["ip", "netns", "exec", vm2, sys.executable, "-m", "interceptor.cli", "bench",
         "--serve", f"{LINK[1]}:15599"], env=_env("vm2"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        assert "waiting" in server.stdout.readline()
        client = subprocess.run(
            ["ip", "netns", "exec", vm1, sys.executable, "-m", "interceptor.cli", "bench", "xnode",
             "--peer", f"{LINK[1]}:15599", "--quick", "--modes", "iptables,ebpf-nobypass",
             "--out", str(tmp_path)], env=_env("vm1"), capture_output=True, text=True, timeout=600)
        assert client.returncode == 0, client.stderr[-3000:]
        assert server.wait(timeout=60) == 0, server.stdout.read()[-3000:]
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["samples"]) == {"x-machine rr c=1", "x-machine rr c=16", "x-machine crr c=8",
                                       "x-machine stream"}
    for scenario, by_mode in results["samples"].items():
        assert set(by_mode) == {"iptables", "ebpf-nobypass"}, scenario
        for sample in (s for runs in by_mode.values() for s in runs):
            assert (sample.get("rps") or sample.get("gbit_s")), (scenario, sample)
            assert sample["sidecars_ms"] is not None
    assert results["peer_env"]["kernel"] and results["env"]["kernel"]
    assert "x-machine rr c=16" in (tmp_path / "summary.txt").read_text()

    # nothing left: pins, state, lab namespaces, routes, forwarding
    for name in ("vm1", "vm2"):
        assert not os.path.exists(f"/sys/fs/bpf/interceptor-test-{name}")
        assert not os.path.exists(f"/run/interceptor-test-{name}/node.json")
        shutil.rmtree(f"/run/interceptor-test-{name}")     # its lock and operation counters
    assert _netns_names() == before
    for vm in (vm1, vm2):
        routes = subprocess.run(["ip", "-n", vm, "route"], capture_output=True, text=True).stdout
        assert "10.91.0.0" not in routes and "10.92.0.0" not in routes, routes
        fwd = subprocess.run(["ip", "netns", "exec", vm, "sysctl", "-n", "net.ipv4.ip_forward"],
                             capture_output=True, text=True).stdout.strip()
        assert fwd == "0"
