"""load / unload against the real kernel: idempotent, repairable, and leaving nothing
behind (checked with bpftool, not with our own bookkeeping)."""
import ctypes
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import (bpftool, client, enroll, load_without, sidecar_entries, start_server, start_sidecar,
                      wait_gone)
from interceptor import abi, paths
from interceptor.kernel import libbpf
from interceptor.pod import podrecord
from interceptor.datapath import node_state
from interceptor.datapath.programs import BYPASS_MAP, POD_COPY, PROGRAMS
from interceptor.ops import enrollment, ensure, loader

pytestmark = pytest.mark.kernel

OUR_PROGS = {p.name for p in PROGRAMS}


def cgroup_attachments():
    node = json.load(open(paths.NODE_STATE))
    return [a for a in bpftool("cgroup", "show", node["cgroup"]) if a.get("name") in OUR_PROGS]


def pinned_prog_ids():
    ids = {}
    for p in PROGRAMS:
        if p.scope == POD_COPY:
            continue
        fd = libbpf.obj_get(paths.prog_pin(p.name))
        ids[p.name] = libbpf.obj_info(fd, libbpf.ProgInfo).id
        os.close(fd)
    return ids


def sk_msg_attached():
    fd = libbpf.obj_get(paths.map_pin(BYPASS_MAP))
    try:
        return len(libbpf.prog_query(fd, libbpf.AttachType.SK_MSG_VERDICT)) > 0
    finally:
        os.close(fd)


@pytest.fixture
def clean():
    loader.unload()
    yield
    loader.unload()


def test_load_twice_changes_nothing(clean):
    assert ensure.load() == "loaded"
    ids = pinned_prog_ids()
    attached = cgroup_attachments()
    assert sorted(a["name"] for a in attached) == sorted(
        p.name for p in PROGRAMS if p.scope == "cgroup")
    assert ensure.load() == "already loaded"
    assert pinned_prog_ids() == ids
    assert len(cgroup_attachments()) == len(attached)


def test_unload_leaves_nothing(clean, lab):
    ensure.load()
    pod = lab.add_pod("a")
    enroll(pod)
    assert os.path.exists(paths.pod_link_pin(enrollment.netns.cookie_of(pod.netns_path), "sk_lookup"))
    loader.unload()
    loader.unload()     # idempotent
    assert not os.path.exists(paths.PIN_ROOT)
    assert not os.path.exists(paths.NODE_STATE)
    assert not os.path.exists(paths.POD_STATE)
    progs, links = wait_gone()
    assert progs == [] and links == [], "programs or links outlived unload"


def test_interrupted_load_is_repaired(clean):
    from interceptor import store
    ensure.load()
    ids = pinned_prog_ids()
    # simulate a load killed before it completed: one attachment missing
    libbpf.detach_link_pin(paths.link_pin("connect4"))
    store.write_json(paths.NODE_STATE, dict(store.read_json(paths.NODE_STATE), complete=False))
    assert not node_state.is_loaded()
    assert ensure.load() == "loaded"
    assert node_state.is_loaded()
    assert pinned_prog_ids() != ids       # a fresh, complete load
    assert len(cgroup_attachments()) == sum(p.scope == "cgroup" for p in PROGRAMS)


def test_a_load_that_lost_a_link_or_program_is_repaired_keeping_its_pods(clean, lab):
    """Pins removed behind interceptor's back (by hand, by another tool): `load` (or the
    agent) puts the programs back into the load that is there. Tearing it down would
    uncapture every enrolled pod until each was enrolled again."""
    from interceptor.kernel import netns
    from interceptor.ops import status
    ensure.load()
    a, b = lab.add_pod("a"), lab.add_pod("b")
    start_server(b)
    log = start_sidecar(lab, a)
    enroll(a)
    cookie = netns.cookie_of(a.netns_path)
    maps_before = {n: libbpf.pinned_info(paths.map_pin(n), libbpf.MapInfo).id for n in ("pods", "redirected")}
    libbpf.detach_link_pin(paths.link_pin("connect4"))
    os.unlink(paths.prog_pin("sockops"))
    assert not node_state.is_loaded()
    assert any("connect4" in e or "sockops" in e or "incomplete" in e for e in status.collect()["errors"])
    assert ensure.load() == "repaired"
    assert node_state.is_loaded() and not status.collect()["errors"]
    assert len(cgroup_attachments()) == sum(p.scope == "cgroup" for p in PROGRAMS)
    assert {n: libbpf.pinned_info(paths.map_pin(n), libbpf.MapInfo).id for n in maps_before} == maps_before
    rec = podrecord.read(cookie)
    assert rec is not None and not enrollment.verify(rec, a.netns_path)
    assert client(a, b.ipv4)["reply"]["bytes"] == 5
    assert [e["orig_dst"] for e in sidecar_entries(log)] == [f"{b.ipv4}:8080"]
    assert ensure.load() == "already loaded"


def test_bypass_switch_attaches_and_detaches_sk_msg(clean):
    ensure.load(bypass=False)
    assert not sk_msg_attached()
    assert ensure.load(bypass=True) == "bypass switched"
    assert sk_msg_attached()
    assert ensure.load(bypass=False) == "bypass switched"
    assert not sk_msg_attached()


def test_without_the_datapath_nothing_is_intercepted(clean, lab):
    """The control for every datapath test: same pods, same proxy, same client, no
    programs: the client still gets its answer, and the proxy sees nothing."""
    a = lab.add_pod("a")
    b = lab.add_pod("b")
    start_server(b)
    log = start_sidecar(lab, a)
    with pytest.raises(enrollment.EnrollError, match="not loaded"):
        enroll(a)
    out = client(a, b.ipv4)
    assert out["reply"]["bytes"] == 5
    assert sidecar_entries(log) == []


def test_load_at_a_given_cgroup(clean):
    from interceptor.kernel import mounts
    root, _ = mounts.ensure_cgroup2()
    child = os.path.join(root, f"interceptor-test-{os.getpid()}")
    os.makedirs(child, exist_ok=True)
    try:
        ensure.load(cgroup=child)
        names = {a["name"] for a in bpftool("cgroup", "show", child)}
        assert names == {p.name for p in PROGRAMS if p.scope == "cgroup"}
        with pytest.raises(loader.LoadError, match="already loaded at cgroup"):
            ensure.load(cgroup=root)
        loader.unload()
        assert bpftool("cgroup", "show", child) == []
    finally:
        loader.unload()
        os.rmdir(child)


def test_without_bcc_load_says_so_and_rules_run_only_when_asked(clean, lab, monkeypatch):
    """A node whose kernel has every feature but where BCC cannot compile (no headers,
    no python3-bpfcc) is a broken install: doctor and load say so, neither auto nor ebpf
    settles quietly for REDIRECT rules; asked for nftables, interception works."""
    monkeypatch.setenv("INTERCEPTOR_DISABLE_FEATURES", "bcc_compile")
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "doctor"], capture_output=True, text=True)
    assert r.returncode == 1
    assert re.search(r"bcc_compile\s+missing\s+disabled by INTERCEPTOR_DISABLE_FEATURES", r.stdout)
    assert re.search(r"Mode:\s+unavailable \(this kernel has every feature", r.stdout)
    for mode in ("auto", "ebpf"):
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "load", "--mode", mode],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "BCC" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not node_state.is_loaded() and not os.path.exists(paths.PIN_ROOT)
    assert ensure.load(mode="nftables") == "loaded"
    assert node_state.node_plan().mode == "nftables"
    assert not os.path.exists(paths.PIN_ROOT)
    a = lab.add_pod("a")
    b = lab.add_pod("b")
    start_server(b)
    log = start_sidecar(lab, a)
    enroll(a)
    assert client(a, b.ipv4)["reply"]["bytes"] == 5
    assert [e["orig_dst"] for e in sidecar_entries(log)] == [f"{b.ipv4}:8080"]
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "status", "-o", "json"],
                       capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert report["node"]["mode"] == "nftables"
    assert report["pods"][0]["mode"] == {"outbound": "rules", "inbound": "rules"}
    assert report["pods"][0]["redirected"]["outbound"] == 1
    loader.unload()
    assert a.run("nft", "list", "ruleset").stdout == ""


def test_a_datapath_of_another_layout_is_refused_not_written(clean, lab):
    """A plugin or CLI of one version meeting a datapath of another (an upgrade half
    done): a map whose key or value size differs is reported, and nothing is written."""
    from interceptor.pod.podspec import PodSettings
    from interceptor.datapath.maps import Maps
    from interceptor.ops import status
    from interceptor.cni import plugin as cni
    ensure.load()
    pod = lab.add_pod("a")
    # the pods map as a version with a 4-byte larger value would have pinned it
    os.unlink(paths.map_pin("pods"))
    other = ctypes.sizeof(abi.PodConfig) + 4
    fd = libbpf.map_create(libbpf.MapType.HASH, 8, other, 16)
    libbpf.obj_pin(fd, paths.map_pin("pods"))
    os.close(fd)
    with pytest.raises(enrollment.NotLoadedError, match=f"map pods: value is {other} bytes in the loaded "
                       f"datapath, {ctypes.sizeof(abi.PodConfig)} in this interceptor"):
        enrollment.enroll(pod.netns_path, PodSettings(), pod="test/a")
    assert podrecord.all_records() == {}
    with Maps() as maps:
        assert maps.pod_addrs.keys() == [] and maps.port_rules.keys() == []
    assert any("different versions" in e for e in status.collect()["errors"])
    # the CNI plugin asks the runtime to try again (the upgrade will complete)
    code, doc = cni.run({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": pod.netns_path,
                         "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"},
                        json.dumps({"cniVersion": "1.0.0", "name": "t", "type": "interceptor-cni",
                                    "prevResult": {"cniVersion": "1.0.0", "interfaces": [],
                                                   "ips": [{"address": f"{pod.ipv4}/24"}]}}))
    assert code == 1 and doc["code"] == 11 and "different versions" in doc["msg"], doc


def test_a_rules_mode_load_neither_compiles_nor_probes_bpf(clean):
    from interceptor.ops import capabilities, doctor
    checks = [c.name for c in doctor.run(only=capabilities.probes_for("nftables")).checks]
    assert checks == ["nftables", "iptables"]
    out = subprocess.run([sys.executable, "-c", "import sys; from interceptor.ops import ensure; "
                          "ensure.load(mode='nftables'); print(sorted(m for m in ('bcc', 'pyroute2') "
                          "if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert node_state.is_loaded() and not os.path.exists(paths.PIN_ROOT)


def test_only_the_programs_the_plan_uses_are_loaded(clean):
    """sk_lookup reported absent and both filter stubs refused by the kernel: inbound
    runs on rules and the filter on nftables, so neither program is loaded (an old
    kernel without them must still load)."""
    load_without("sk_lookup", refused="tc_pod,xdp_pod")
    plan = node_state.node_plan()
    assert (plan.inbound, plan.ingress) == ("rules", "nftables")
    pinned = set(os.listdir(paths.PIN_PROGS))
    assert {"steer_inbound", "xdp_ingress", "tc_ingress"}.isdisjoint(pinned)
    assert {"connect4", "sockops", "msg_redirect"} <= pinned
    assert node_state.is_loaded() and not os.path.exists(paths.XDP_TEMPLATE)
    assert not os.path.exists(paths.TC_TEMPLATE)
    assert ensure.load(bypass=True, mode="auto") == "bypass switched"    # sk_msg is there to switch
    assert sk_msg_attached()


def test_an_interrupted_upgrade_is_an_error_until_an_upgrade_completes_it(clean):
    """Killed between its first and last link update, an upgrade leaves programs of two
    builds in place: journalled before the swap, status names it (exit 1), and the next
    upgrade, even of the same build, swaps every program again and clears it."""
    from interceptor import store
    from interceptor.ops import status
    ensure.load()
    node = store.read_json(paths.NODE_STATE)
    old_prog = libbpf.pinned_info(paths.link_pin("connect4"), libbpf.LinkInfo).prog_id
    store.write_json(paths.NODE_STATE, dict(node, upgrading_to=node["datapath_version"]))
    report = status.collect()
    assert any("upgrade of the datapath" in e and "interrupted" in e for e in report["errors"])
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "status"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "in place" in ensure.upgrade()
    assert not status.collect()["errors"]
    assert libbpf.pinned_info(paths.link_pin("connect4"), libbpf.LinkInfo).prog_id != old_prog
    assert ensure.upgrade() == "already this version"
