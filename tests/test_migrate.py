"""Maps migrated by an in-place upgrade (migrate.py), on the real kernel: a node resized
with `--map-size` while a pod's traffic runs through its sidecar, and a map of an older
layout (recorded in the node state) converted field by field."""
import ctypes
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import APPS, publish_figures, SERVER_PORT, client, enroll, pod_counters, sidecar_entries, start_server, start_sidecar
from interceptor import abi, paths, store
from interceptor.kernel import libbpf, netns
from interceptor.pod import podrecord
from interceptor.datapath.maps import Maps
from interceptor.datapath.migrate import Layout
from interceptor.ops import enrollment, ensure, loader, status, upgrade

pytestmark = pytest.mark.kernel


@pytest.fixture
def clean():
    loader.unload()
    yield
    loader.unload()


def capacity(name):
    return libbpf.pinned_info(paths.map_pin(name), libbpf.MapInfo).max_entries


def map_id(name):
    return libbpf.pinned_info(paths.map_pin(name), libbpf.MapInfo).id


class Requests:
    """apps.py's load generator in a pod: a new connection per request until stopped."""

    def __init__(self, lab, pod, host):
        self.until = os.path.join(lab.workdir, f"stop-{uuid.uuid4().hex[:6]}")
        self.proc = pod.spawn(sys.executable, APPS, "load", str(host), str(SERVER_PORT), "--until", self.until,
                              stdout=subprocess.PIPE, text=True)

    def stop(self):
        open(self.until, "w").close()
        return json.loads(self.proc.communicate(timeout=60)[0])


def test_resizing_in_place_keeps_pods_traffic_and_counters(clean, lab):
    ensure.load()
    a, b = lab.add_pod("a"), lab.add_pod("b")
    start_server(b)
    log = start_sidecar(lab, a)
    enroll(a, exclude_outbound_ports=[9], ingress_policy=["deny tcp port 7"])
    assert client(a, b.ipv4)["reply"]["bytes"] == 5
    before = pod_counters(a)
    with Maps() as maps:
        rules_before = (len(maps.port_rules.keys()), len(maps.ingress_rules.keys()), len(maps.pod_addrs.keys()))
    load = Requests(lab, a, b.ipv4)
    time.sleep(1)
    sizes = {"redirected": 131072, "pods": 8192, "stats": 131072}
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "upgrade", *(
        f"--map-size={k}={v}" for k, v in sizes.items())], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "migrated pods (max_entries 4096 -> 8192; 1 entries)" in r.stdout, r.stdout
    time.sleep(1)
    counts = load.stop()
    print(f"requests during the resize: {counts['ok']} ok, {counts['failed']} failed")
    assert counts["failed"] == 0 and counts["ok"] > 50, counts
    # every request went through the sidecar, with its original destination
    entries = sidecar_entries(log)
    assert len(entries) >= counts["ok"] + 1
    assert all(e["orig_dst"] == f"{b.ipv4}:{SERVER_PORT}" for e in entries), entries[-3:]
    assert {name: capacity(name) for name in sizes} == sizes
    publish_figures({"scenario": "resizing pods, redirected and stats in place while a pod's client runs "
                                 "through its sidecar", "tried": {"requests (a connection each)": counts["ok"]},
                     "failures": counts["failed"], "lost": 0, "leftovers": {}})
    node = store.read_json(paths.NODE_STATE)
    assert node["map_sizes"] == sizes and "migrating_maps" not in node
    assert not [p for p in os.listdir(paths.PIN_MAPS) if p.endswith("_migrating")]
    # the pod's entries and counters came along (counted meanwhile too: never reset)
    with Maps() as maps:
        assert (len(maps.port_rules.keys()), len(maps.ingress_rules.keys()), len(maps.pod_addrs.keys())) == rules_before
    after = pod_counters(a)
    label = next(k for k in before if before[k] >= 1 and k.startswith("out"))
    assert after[label] >= before[label] + counts["ok"], (label, before, after)
    rec = podrecord.read(netns.cookie_of(a.netns_path))
    assert not enrollment.verify(rec, a.netns_path)
    report = status.collect()
    assert not report["errors"] and report["node"]["datapath_version"] == node["datapath_version"]
    # a same-size upgrade is no upgrade; the CLI keeps the sizes it was not given
    assert ensure.upgrade() == "already this version"
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "upgrade", "--map-size", "pods=4096"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and capacity("pods") == 4096 and capacity("redirected") == 131072, r.stdout
    # a pod enrolled after the resize lands in the resized maps
    c = lab.add_pod("c")
    c_log = start_sidecar(lab, c)
    enroll(c)
    assert client(c, b.ipv4)["reply"]["bytes"] == 5
    assert [e["orig_dst"] for e in sidecar_entries(c_log)] == [f"{b.ipv4}:{SERVER_PORT}"]


def test_too_small_or_uncopyable_is_refused_and_changes_nothing(clean, lab):
    ensure.load()
    pods = [lab.add_pod(n) for n in "ab"]
    for pod in pods:
        enroll(pod)
    ids = {name: map_id(name) for name in ("pods", "inbound_listeners")}
    version = store.read_json(paths.NODE_STATE)["datapath_version"]
    for sizes, why in (({"pods": 1}, "map pods holds 2 entries, more than the new capacity of 1"),
                       ({"inbound_listeners": 100}, "map inbound_listeners holds sockets")):
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "upgrade", *(
            f"--map-size={k}={v}" for k, v in sizes.items())], capture_output=True, text=True)
        assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {name: map_id(name) for name in ids} == ids
    assert store.read_json(paths.NODE_STATE)["datapath_version"] == version
    assert not status.collect()["errors"]
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "upgrade", "--map-size", "pods=many"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "whole number" in r.stderr


def _older_pods_map(entries):
    """The pods map as a version with neither PodConfig.flags nor the fields after it
    would have pinned it, and the layout that version recorded."""
    fields = [f for f in Layout.of(abi.PodConfig).fields
              if f.name in ("proxy_uid", "proxy_gid", "outbound_port", "inbound_port")]
    old = Layout(12, fields)

    class OldPodConfig(ctypes.Structure):
        _fields_ = [(f.name, ctypes.c_uint32 if f.size == 4 else ctypes.c_uint16) for f in fields]
    assert ctypes.sizeof(OldPodConfig) == old.size
    os.unlink(paths.map_pin("pods"))
    fd = libbpf.map_create(libbpf.MapType.HASH, 8, old.size, abi.MAX_PODS)
    for cookie, (uid, port) in entries.items():
        libbpf.map_update(fd, ctypes.c_uint64(cookie), OldPodConfig(uid, uid, port, port + 1))
    libbpf.obj_pin(fd, paths.map_pin("pods"))
    os.close(fd)
    return old


def test_a_map_of_an_older_layout_is_converted_field_by_field(clean):
    ensure.load()
    old = _older_pods_map({101: (1337, 15001), 102: (2000, 16001)})
    node = store.read_json(paths.NODE_STATE)
    node["map_layouts"]["pods"]["value"] = old.as_json()
    node["datapath_version"] = "older"
    store.write_json(paths.NODE_STATE, node)
    summary = ensure.upgrade()
    assert f"migrated pods (value_size 12 -> {ctypes.sizeof(abi.PodConfig)}; 2 entries)" in summary, summary
    with Maps() as maps:
        got = {k.value: (v.proxy_uid, v.proxy_gid, v.outbound_port, v.inbound_port, v.flags, v.skip_mark_mask)
               for k, v in maps.pods.items()}
    assert got == {101: (1337, 1337, 15001, 15002, 0, 0), 102: (2000, 2000, 16001, 16002, 0, 0)}
    # readable by this version (the entries are made up: no pod records behind them)
    assert all("no record" in e for e in status.collect()["errors"])


def test_a_layout_that_cannot_be_converted_or_is_not_recorded_is_refused(clean):
    ensure.load()
    old = _older_pods_map({101: (1337, 15001)})
    kept = map_id("pods")
    node = store.read_json(paths.NODE_STATE)
    node["datapath_version"] = "older"
    # no record of the older layout: 12 bytes cannot be guessed into the current size
    node["map_layouts"].pop("pods")
    store.write_json(paths.NODE_STATE, node)
    with pytest.raises(upgrade.UpgradeError, match=f"changes size .12 -> {ctypes.sizeof(abi.PodConfig)} bytes. "
                       "and the loaded datapath's layout of it is not recorded"):
        ensure.upgrade()
    # recorded, but a field that was wider than it is now
    shrunk = Layout(old.size, [f if f.name != "inbound_port" else type(f)(f.name, f.offset, 8, "int")
                               for f in old.fields])
    node["map_layouts"]["pods"] = {"key": None, "value": shrunk.as_json()}
    store.write_json(paths.NODE_STATE, node)
    with pytest.raises(upgrade.UpgradeError, match="field inbound_port changes from 8 bytes"):
        ensure.upgrade()
    assert map_id("pods") == kept and store.read_json(paths.NODE_STATE)["datapath_version"] == "older"


def test_migrated_maps_left_pinned_by_a_killed_upgrade_are_resolved(clean):
    """Killed before its swap, an upgrade's new maps are unused: dropped. Killed after
    the swap began (journalled), new programs may use them: they take their place."""
    ensure.load()
    for journalled in (False, True):
        fd = libbpf.map_create(libbpf.MapType.HASH, 8, ctypes.sizeof(abi.PodConfig), abi.MAX_PODS)
        staged_id = libbpf.obj_info(fd, libbpf.MapInfo).id
        libbpf.obj_pin(fd, paths.map_pin("pods") + "_migrating")
        os.close(fd)
        node = store.read_json(paths.NODE_STATE)
        if journalled:
            node.update(upgrading_to=node["datapath_version"], migrating_maps=["pods"])
            store.write_json(paths.NODE_STATE, node)
        result = ensure.upgrade()
        assert not os.path.lexists(paths.map_pin("pods") + "_migrating")
        assert (map_id("pods") == staged_id) == journalled
        assert ("in place" in result) == journalled, result
        assert not status.collect()["errors"]


def test_unload_and_load_under_load_fail_no_request_and_the_uncaptured_gap_is_measured(clean, lab):
    """unload is the one operation that stops interception: it removes every pod's
    enrollment. Requests meanwhile still succeed (they go straight to the server); how
    many went uncaptured until the pod was enrolled again is the gap, measured."""
    ensure.load()
    a, b = lab.add_pod("a"), lab.add_pod("b")
    start_server(b)
    log = start_sidecar(lab, a)
    enroll(a)
    load = Requests(lab, a, b.ipv4)
    time.sleep(1)
    started = time.monotonic()
    loader.unload()
    ensure.load()
    enroll(a)
    gap = time.monotonic() - started
    time.sleep(1)
    counts = load.stop()
    captured = len(sidecar_entries(log))
    uncaptured = counts["ok"] - captured
    print(f"unload + load + enroll under load: {counts['ok']} ok, {counts['failed']} failed, "
          f"{uncaptured} not through the sidecar during a {gap:.2f}s gap")
    assert counts["failed"] == 0 and counts["ok"] > 50, counts
    assert uncaptured > 0            # the gap is real: that is why upgrades are in place
    publish_figures({"scenario": "unload, load and enroll again while a pod's client runs through its sidecar "
                                 "(interception stops: measured, not hidden)",
                     "tried": {"requests": counts["ok"], f"went direct during the {gap:.1f}s gap": uncaptured},
                     "failures": counts["failed"], "lost": 0, "leftovers": {}})
