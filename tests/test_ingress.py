"""The per-pod ingress filter against the real kernel: on the tc hook (the default on a
veth), XDP (native and generic) and the nftables fallback, with packets built by scapy
and put on the wire at the pod veth's other end (the node namespace), so nothing
between the sender and the filter can judge them first.

Each table case is a packet, the verdict and the counter that must move. "Delivered"
is observed independently of our counters where the filter is BPF: a packet socket in
the pod sees only what the filter passed (taps for every protocol run after XDP but
before tc, so under tc the sockets are bound to each case's protocol: those run after
it; for the nftables chain the counters and real connections are the evidence).
"""
import ctypes
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from conftest import enroll, load_without, loaded, pod_counters, pods_lab
from ingress_table import APP_PORT, CASES, NET, NOT_SEEN, PEER4, POLICY, TARGET4, TARGET6, TC_LABELS, eth, tcp4
from interceptor import abi, paths
from interceptor.kernel import netns
from interceptor.pod import ingress_policy, podrecord
from interceptor.datapath.maps import Maps
from interceptor import pieces
from interceptor.ops import enrollment, loader

pytestmark = [pytest.mark.kernel, pytest.mark.ingress_filter]

ETH_P_ALL = 0x0003
# mechanism -> (programs the kernel is made to refuse, the pod's ingress_filter setting).
# nftables is where the kernel refuses both BPF filters (the chain XDP -> tc -> nftables).
MECHANISMS = {
    "tc": ("", "tc"),
    "native": ("", "native"),
    "generic": ("", "generic"),
    "nftables": ("tc_ingress,xdp_ingress", "auto"),
}


@pytest.fixture(scope="module", params=list(MECHANISMS))
def mechanism(request):
    refused, _ = MECHANISMS[request.param]
    with loaded(refused=refused) as plan:
        assert plan.ingress == ("nftables" if request.param == "nftables" else "xdp")
        yield request.param


@pytest.fixture
def flab(mechanism):
    with pods_lab("icx", NET) as lab:
        yield lab


def enroll_filtered(pod, mechanism, **settings):
    rec = enroll(pod, ingress_filter=MECHANISMS[mechanism][1], **settings)
    piece, applied = pieces.filter_of(rec)
    if mechanism == "nftables":
        assert piece.mechanism == "nftables"
    else:
        assert piece.mechanism == "xdp" and applied["interfaces"][0]["mode"] == mechanism, applied
    return rec


def filter_interfaces(rec):
    return pieces.filter_of(rec)[1]["interfaces"]


def record_of(name):
    return next(r for r in podrecord.all_records().values() if r.pod == name)


def xdp_attached(pod):
    out = pod.run("ip", "-d", "link", "show", "eth0").stdout
    return "xdpgeneric" if "xdpgeneric" in out else ("xdp" if " xdp " in out or "prog/xdp" in out else None)


def tc_attached(pod):
    """Our tc filter on the pod's eth0 ingress, as `tc` lists it."""
    out = pod.run("tc", "filter", "show", "dev", "eth0", "ingress", check=False).stdout
    return "interceptor" in out and "direct-action" in out


def clsact_present(pod):
    return "clsact" in pod.run("tc", "qdisc", "show", "dev", "eth0").stdout


# what the kernel shows on eth0 for each mechanism
ATTACHED = {"native": "xdp", "generic": "xdpgeneric", "tc": "tc"}


def filter_attached(pod):
    return "tc" if tc_attached(pod) else xdp_attached(pod)


# The protocols of the table's frames: packet sockets bound to one protocol see a frame
# after tc's verdict on it (for ETH_P_ALL, before).
CASE_PROTOCOLS = (0x0800, 0x86DD, 0x0806, 0x88CC)


class Wire:
    """Frames sent from the node namespace on the pod's veth peer, and packet sockets
    inside the pod that see what got past the filter."""

    def __init__(self, lab, pod, after_tc=False):
        host_if = f"{lab.prefix}{pod.name}"[:15]
        with netns.entered(f"/run/netns/{lab.node_ns}"):
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.tx.bind((host_if, 0))
        self.rx = []
        with netns.entered(pod.netns_path):
            for proto in (CASE_PROTOCOLS if after_tc else (ETH_P_ALL,)):
                rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
                rx.bind(("eth0", proto))
                rx.setblocking(False)
                self.rx.append(rx)
        self.src_mac = ":".join(f"{b:02x}" for b in self.tx.getsockname()[4])
        self.dst_mac = ":".join(f"{b:02x}" for b in self.rx[0].getsockname()[4])
        self.seen = []

    def send(self, frame):
        self.tx.send(frame)

    def drain(self):
        for rx in self.rx:
            while True:
                try:
                    self.seen.append(rx.recv(65535))
                except BlockingIOError:
                    break

    def saw(self, frame):
        self.drain()
        return frame in self.seen

    def close(self):
        self.tx.close()
        for rx in self.rx:
            rx.close()


@pytest.fixture
def target(flab, mechanism):
    flab.add_pod("peer")
    pod = flab.add_pod("target")
    assert str(pod.ipv4) == TARGET4 and str(pod.ipv6) == TARGET6
    enroll_filtered(pod, mechanism, ingress_policy=POLICY)
    wire = Wire(flab, pod, after_tc=mechanism == "tc")
    yield pod, wire
    wire.close()


def wait_counter(pod, label, before, timeout=3):
    deadline = time.monotonic() + timeout
    while True:
        now = pod_counters(pod)
        if now.get(label, 0) > before.get(label, 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def test_packet_table(target, mechanism):
    pod, wire = target
    if mechanism != "nftables":
        assert filter_attached(pod) == ATTACHED[mechanism]
    failures = []
    for desc, build, delivered, label, nft_label in CASES:
        if mechanism == "nftables":
            label = nft_label or label
        elif mechanism == "tc":
            label = TC_LABELS.get(desc, label)
        if label == NOT_SEEN:
            continue
        marker = b"IC-MARK-" + uuid.uuid4().hex[:12].encode()
        frame = build(wire, marker)
        before = pod_counters(pod)
        wire.send(frame)
        after = wait_counter(pod, label, before)
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after
                 if k.startswith("ingress_") and after.get(k, 0) != before.get(k, 0)}
        if moved.get(label, 0) < 1:
            failures.append(f"{desc}: expected {label} to move, moved {moved}")
        drops = {k for k in moved if k.startswith("ingress_dropped_")}
        if drops - {label}:
            failures.append(f"{desc}: unexpected drop counters {sorted(drops - {label})}")
        if mechanism != "nftables":
            deadline = time.monotonic() + (1.0 if delivered else 0.2)
            seen = wire.saw(frame)
            while delivered and not seen and time.monotonic() < deadline:
                time.sleep(0.02)
                seen = wire.saw(frame)
            if seen != delivered:
                failures.append(f"{desc}: {'not ' if delivered else ''}seen inside the pod "
                                f"(expected {'delivered' if delivered else 'dropped'})")
    assert not failures, "\n".join(failures)


# --- behaviour with real connections --------------------------------------------------
ECHO = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept()
        def echo(c=c):
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
            c.close()
        threading.Thread(target=echo, daemon=True).start()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""


def connect_from(pod, host, port, timeout=1.0):
    """A TCP socket made in pod's namespace (sockets keep their namespace)."""
    with netns.entered(pod.netns_path):
        s = socket.socket()
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def can_connect(pod, host, port):
    try:
        connect_from(pod, host, port).close()
        return True
    except OSError:
        return False


def roundtrip(s, data=b"ping"):
    try:
        s.sendall(data)
        return s.recv(64) == data
    except OSError:
        return False


def policy_cli(*args):
    return subprocess.run([sys.executable, "-m", "interceptor.cli", "policy", *args],
                          capture_output=True, text=True)


def test_the_filter_is_in_place_before_capture_is_switched_on(flab, mechanism, monkeypatch):
    """Once the pods entry exists the pod's traffic goes through its proxy, whose
    internal ports must then already be shielded: enroll applies the filter first, and a
    re-enroll never takes the protected ports away while the pod stays captured."""
    pod = flab.add_pod("target")
    cookie = netns.cookie_of(pod.netns_path)

    def captured():
        with Maps() as maps:
            return maps.pods.get(ctypes.c_uint64(cookie)) is not None

    def protected():
        with Maps() as maps:
            return sorted(k.port for k in maps.port_rules.keys()
                          if k.netns_cookie == cookie and k.kind == abi.PortKind.PROTECTED)

    seen = []
    the_filter = pieces.FilterNftables if mechanism == "nftables" else pieces.FilterXdp
    real_filter, real_capture = the_filter.apply, pieces.CaptureBpf.apply

    def apply_filter(*args, **kwargs):
        seen.append(("filter applied, captured", captured()))
        return real_filter(*args, **kwargs)

    def apply_capture(*args, **kwargs):
        seen.append(("capture rules written, protected", protected()))
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(the_filter, "apply", apply_filter)
    monkeypatch.setattr(pieces.CaptureBpf, "apply", apply_capture)
    enroll_filtered(pod, mechanism)
    shielded = [] if mechanism == "nftables" else [abi.ADMIN_PORT, abi.OUTBOUND_PORT]
    assert seen == [("filter applied, captured", False),
                    ("capture rules written, protected", shielded)]
    assert captured()
    seen.clear()
    enroll_filtered(pod, mechanism, exclude_outbound_ports=[22])     # re-enroll
    assert seen == [("filter applied, captured", True),
                    ("capture rules written, protected", shielded)]


def test_live_policy_change_keeps_allowed_flows(flab, mechanism):
    """Through the real sidecar (HAProxy, inbound steering): an established connection
    survives policy edits that keep it allowed, stops while denied, resumes after."""
    peer = flab.add_pod("peer")
    pod = flab.add_pod("target")
    enroll_filtered(pod, mechanism)
    flab.start_haproxy(pod)
    server = pod.spawn(sys.executable, "-c", ECHO, "8080", "8081", stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    link_before = _attachment_ids(pod)

    conn = connect_from(peer, TARGET4, 8080, timeout=2)
    assert roundtrip(conn)
    assert not can_connect(peer, TARGET4, 15001)          # protected by default
    assert pod_counters(pod).get("ingress_dropped_protected_port", 0) >= 1

    # allow-only for 8080: the running flow stays, 8081 stops accepting new flows
    p = policy_cli("add", "--pod", "test/target", "allow tcp port 8080")
    assert p.returncode == 0, p.stderr
    assert roundtrip(conn)
    assert can_connect(peer, TARGET4, 8080)
    assert not can_connect(peer, TARGET4, 8081)
    assert pod_counters(pod).get("ingress_dropped_not_allowed", 0) >= 1

    # an unrelated deny leaves it alone; a deny for its source stops it
    assert policy_cli("add", "--pod", "test/target", f"deny from 10.{NET}.0.200/32").returncode == 0
    assert roundtrip(conn)
    assert policy_cli("add", "--pod", "test/target", f"deny from {PEER4}/32 tcp port 8080").returncode == 0
    conn.settimeout(0.5)
    assert not roundtrip(conn, b"blocked")
    assert pod_counters(pod).get("ingress_dropped_denied", 0) >= 1

    # removing the deny: TCP retransmits and the same connection carries on
    assert policy_cli("remove", "--pod", "test/target", f"deny from {PEER4}/32 tcp port 8080").returncode == 0
    conn.settimeout(5)
    assert conn.recv(64) == b"blocked"
    assert roundtrip(conn)
    assert _attachment_ids(pod) == link_before, "the program was re-attached"

    listed = policy_cli("list", "--pod", "test/target")
    assert "allow tcp port 8080" in listed.stdout and f"deny from 10.{NET}.0.200/32" in listed.stdout
    rec = record_of("test/target")
    assert ingress_policy.rule_text(rec.settings.ingress_policy[0]) == "allow tcp port 8080"
    conn.close()


def _attachment_ids(pod):
    """The XDP links' ids, or the programs' ids in our tc filters."""
    rec = record_of(f"test/{pod.name}")
    if pieces.filter_of(rec)[0].mechanism != "xdp":
        return None
    from interceptor.pieces import tc, xdp
    ids = []
    for a in filter_interfaces(rec):
        if a["mode"] == "tc":
            with netns.entered(pod.netns_path):
                ids += [f.prog_id for f in tc.filters(a["ifindex"]) if tc.ours(f)]
        else:
            ids.append(xdp.link_info(xdp.link_pin(rec.cookie, a["ifindex"])).id)
    return ids


def test_auto_mode_picks_tc_on_veth(flab, mechanism):
    """XDP on a veth costs bulk throughput (generic: a linear copy of every skb; native:
    TSO off on the peer) and a grace period at every attach and detach; tc costs neither."""
    if mechanism != "tc":
        pytest.skip("one run is enough")
    pod = flab.add_pod("target")
    rec = enroll(pod)
    a = filter_interfaces(rec)
    assert a == [{"ifname": "eth0", "ifindex": a[0]["ifindex"], "driver": "veth", "mode": "tc",
                  "clsact_ours": True, "prog_id": a[0]["prog_id"]}]
    assert tc_attached(pod) and xdp_attached(pod) is None


def test_bad_policy_changes_nothing(flab, mechanism):
    flab.add_pod("peer")
    pod = flab.add_pod("target")
    enroll_filtered(pod, mechanism, ingress_policy=["deny udp port 53"])
    p = policy_cli("add", "--pod", "test/target", "deny from 10.0.0.0/33")
    assert p.returncode == 2 and "not a CIDR" in p.stderr
    p = policy_cli("remove", "--pod", "test/target", "deny tcp port 1")
    assert p.returncode == 1 and "no rule" in p.stderr
    rec = record_of("test/target")
    assert [ingress_policy.rule_text(r) for r in rec.settings.ingress_policy] == ["deny udp port 53"]
    with pytest.raises(ValueError, match="ingress_policy"):
        enroll(pod, ingress_filter=MECHANISMS[mechanism][1], ingress_policy=["deny tcp port 0"])
    rec = record_of("test/target")
    assert [ingress_policy.rule_text(r) for r in rec.settings.ingress_policy] == ["deny udp port 53"]
    assert not enrollment.verify(rec, pod.netns_path)


# --- lifecycle --------------------------------------------------------------------------
def ingress_entries(cookie):
    with Maps() as maps:
        return (maps.xdp_pods.get(ctypes.c_uint64(cookie)) is not None,
                sum(k.netns_cookie == cookie for k in maps.ingress_sources.keys()),
                sum(k.netns_cookie == cookie for k in maps.ingress_rules.keys()),
                sum(k.netns_cookie == cookie and k.kind == abi.PortKind.PROTECTED
                    for k in maps.port_rules.keys()),
                sum(k.netns_cookie == cookie and k.reason >= abi.Reason.INGRESS_PASSED
                    for k in maps.stats.keys()))


def nft_table_present(pod):
    return pod.run("nft", "list", "table", "netdev", "interceptor_ingress", check=False).returncode == 0


def test_unenroll_and_unload_detach_everything(flab, mechanism):
    pod = flab.add_pod("target")
    rec = enroll_filtered(pod, mechanism, ingress_policy=POLICY, protected_ports="9999")
    cookie = rec.cookie
    assert not enrollment.verify(rec, pod.netns_path)
    if mechanism == "nftables":
        assert nft_table_present(pod)
    else:
        assert filter_attached(pod) == ATTACHED[mechanism]
        # 3 prefixes; the peer's /32 set also holds the /24's UDP rule: 4 rule entries
        assert ingress_entries(cookie)[:4] == (True, 3, 4, 3)
    # re-enroll: same filter, nothing doubled; then another hook or mode is honoured,
    # and the old one comes off
    rec = enroll_filtered(pod, mechanism, ingress_policy=POLICY, protected_ports="9999")
    assert not enrollment.verify(rec, pod.netns_path)
    if mechanism != "nftables":
        assert ingress_entries(cookie)[:4] == (True, 3, 4, 3)
        other = {"native": "generic", "generic": "tc", "tc": "native"}[mechanism]
        rec = enroll(pod, ingress_filter=other)
        assert filter_interfaces(rec)[0]["mode"] == other and not enrollment.verify(rec, pod.netns_path)
        assert filter_attached(pod) == ATTACHED[other]
        assert (xdp_attached(pod) is None) == (other == "tc")
        assert tc_attached(pod) == clsact_present(pod) == (other == "tc")
        # sk_lookup, and one XDP link where the filter is XDP
        assert len(paths.listdir(paths.pod_pin_dir(cookie))) == (1 if other == "tc" else 2)
        rec = enroll(pod, ingress_filter=mechanism)       # and back
        assert filter_attached(pod) == ATTACHED[mechanism] and not enrollment.verify(rec, pod.netns_path)
    enrollment.unenroll(netns_path=pod.netns_path)
    assert xdp_attached(pod) is None and not nft_table_present(pod)
    assert not tc_attached(pod) and not clsact_present(pod)
    if mechanism != "nftables":
        assert ingress_entries(cookie) == (False, 0, 0, 0, 0)
    assert paths.listdir(paths.PIN_PODS) == []
    # unenroll again: nothing to do, no error
    assert enrollment.unenroll(netns_path=pod.netns_path) == []

    # unload with the pod enrolled takes the filter off too (the fixture reloads after)
    enroll_filtered(pod, mechanism)
    loader.unload()
    assert xdp_attached(pod) is None and not nft_table_present(pod)
    assert not tc_attached(pod) and not clsact_present(pod)
    loader.unload()
    load_without(refused=MECHANISMS[mechanism][0])


def _attach_foreign_xdp(pod):
    """An operator's own XDP program, attached the classic way (netlink, no link)."""
    from interceptor.kernel import libbpf
    from interceptor.pieces import xdp
    prog = libbpf.load_trivial_prog(libbpf.ProgType.XDP, 0, 2)     # XDP_PASS
    try:
        with netns.entered(pod.netns_path):
            libbpf.xdp_attach(socket.if_nametoindex("eth0"), prog, xdp.MODE_FLAGS["generic"])
    finally:
        os.close(prog)


def test_foreign_xdp_program_is_refused_not_replaced(flab, mechanism):
    if mechanism in ("nftables", "tc"):
        pytest.skip("the nftables chain and the tc filter coexist with any XDP program")
    pod = flab.add_pod("target")
    _attach_foreign_xdp(pod)
    with pytest.raises(enrollment.EnrollError, match="already has XDP program .*refusing"):
        enroll(pod, ingress_filter=mechanism)
    assert podrecord.all_records() == {} and paths.listdir(paths.PIN_PODS) == []
    with Maps() as maps:
        assert maps.pods.keys() == [] and maps.xdp_pods.keys() == []
    assert xdp_attached(pod) == "xdpgeneric"          # the operator's program is still there

    rec = enroll(pod, ingress_filter=mechanism, ingress_conflict="skip")
    assert filter_interfaces(rec) == [] and pieces.filter_of(rec)[1]["skipped"][0]["ifname"] == "eth0"
    from interceptor.ops import status
    report = status.collect(pod_filter="test/target")
    assert any("no ingress filter on eth0" in w for w in report["warnings"])
    assert xdp_attached(pod) == "xdpgeneric"


def _add_foreign_tc_filter(pod, pref, verdict):
    """An operator's own tc filter (direct action, returning verdict) on eth0's ingress."""
    from interceptor.kernel import libbpf
    from interceptor.pieces import tc
    prog = libbpf.load_trivial_prog(libbpf.ProgType.SCHED_CLS, 0, verdict)
    try:
        with netns.entered(pod.netns_path):
            ifindex = socket.if_nametoindex("eth0")
            tc.add_clsact(ifindex)
            tc.set_filter(ifindex, prog, pref=pref, name="operator")
    finally:
        os.close(prog)


def test_foreign_tc_filter_in_our_place_is_refused_and_others_still_run(flab, mechanism):
    """Ours is judged first and passes with TC_ACT_UNSPEC, so an operator's filter after
    it still runs; one already in our place is refused, or skipped on request."""
    if mechanism != "tc":
        pytest.skip("the tc hook only")
    from interceptor.pieces import tc
    pod = flab.add_pod("target")
    _add_foreign_tc_filter(pod, tc.TC_PREF, 0)       # TC_ACT_OK
    with pytest.raises(enrollment.EnrollError, match="already has tc filter .*refusing"):
        enroll(pod, ingress_filter="tc")
    assert podrecord.all_records() == {} and paths.listdir(paths.PIN_PODS) == []
    assert "operator" in pod.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout
    rec = enroll(pod, ingress_filter="tc", ingress_conflict="skip")
    assert filter_interfaces(rec) == [] and pieces.filter_of(rec)[1]["skipped"][0]["ifname"] == "eth0"
    enrollment.unenroll(netns_path=pod.netns_path)
    assert "operator" in pod.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout
    pod.run("tc", "qdisc", "del", "dev", "eth0", "clsact")

    _add_foreign_tc_filter(pod, 7, 2)                # behind ours: TC_ACT_SHOT, everything
    enroll_filtered(pod, mechanism)
    wire = Wire(flab, pod, after_tc=True)
    try:
        passed = bytes(eth(wire) / tcp4(APP_PORT) / b"IC-MARK-theirs")
        before = pod_counters(pod)
        wire.send(passed)
        wait_counter(pod, "ingress_passed", before)
        time.sleep(0.2)
        assert not wire.saw(passed), "the operator's filter behind ours did not run"
    finally:
        wire.close()
    enrollment.unenroll(netns_path=pod.netns_path)
    out = pod.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout
    assert "operator" in out and "interceptor" not in out and clsact_present(pod)   # theirs


def test_status_and_metrics_show_the_filter(flab, mechanism):
    pod = flab.add_pod("target")
    enroll_filtered(pod, mechanism)
    wire = Wire(flab, pod)
    try:
        frame = bytes(eth(wire) / tcp4(15001))
        before = pod_counters(pod)
        wire.send(frame)
        wait_counter(pod, "ingress_dropped_protected_port", before)
    finally:
        wire.close()
    from interceptor.ops import status
    from interceptor.agent import metrics
    report = status.collect(pod_filter="test/target")
    ing = report["pods"][0]["ingress"]
    assert report["node"]["capabilities"]["ingress"] == ("nftables" if mechanism == "nftables" else "tc/xdp")
    assert ing["interfaces"] == [{"ifname": "eth0", "mode": mechanism}]
    assert ing["dropped_by_reason"]["protected_port"] >= 1 and ing["protected_ports"] == [15000, 15001]
    text = status.render(report, wide=True)
    assert {"nftables": "nftables eth0", "tc": "tc eth0"}.get(mechanism, f"xdp eth0:{mechanism}") in text
    if mechanism != "nftables":
        # the filter behind every stub gone: status says so (the stubs then pass everything)
        array, prog = ("tc_main", "tc_ingress") if mechanism == "tc" else ("xdp_main", "xdp_ingress")
        with Maps() as maps:
            saved = getattr(maps, array).get(ctypes.c_uint32(0))
            getattr(maps, array).delete(ctypes.c_uint32(0))
        try:
            assert any(f"missing from {array}" in e for e in status.collect()["errors"])
        finally:
            from interceptor.kernel import libbpf
            fd = libbpf.obj_get(paths.prog_pin(prog))
            with Maps() as maps:
                getattr(maps, array).put(ctypes.c_uint32(0), ctypes.c_uint32(fd))
            os.close(fd)
        assert saved is not None and not status.collect()["errors"]
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(metrics.DatapathCollector())
    scraped = generate_latest(registry).decode()
    assert f'interceptor_ingress_filter{{interface="eth0",mode="{mechanism}",pod="test/target"}} 1.0' in scraped
    assert 'interceptor_ingress_packets_total{pod="test/target",reason="protected_port",verdict="dropped"}' \
        in scraped
