"""Enrollment as a journal of datapath pieces (interceptor/pieces/): a run killed at any
piece boundary leaves a record that says so, status and CHECK call it incomplete, and
both ways forward converge: DEL leaves nothing, a new ADD ends healthy. Killed for real
(SIGKILL from inside the enrolling process), in each mode's set of pieces."""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import killed_after, loaded, pods_lab, publish_figures
from interceptor import abi, paths
from interceptor.kernel import netns
from interceptor.pod import podrecord
from interceptor.pod.podspec import PodSettings
from interceptor.pod.problems import Kind
from interceptor.datapath import node_state
from interceptor.datapath.maps import LAYOUT, SINGLE_SLOT, SK_STORAGE, Maps
from interceptor import pieces
from interceptor.ops import enrollment, status

pytestmark = pytest.mark.kernel

NET = 81
SETTINGS = dict(exclude_outbound_ports=[5432], exclude_outbound_cidrs=["192.0.2.0/24"],
                include_inbound_ports=[8080], protected_ports=[9901],
                ingress_policy=["deny udp port 53"])

# mode -> load arguments; the pieces each gives a pod are asserted below
MODES = {"ebpf": dict(mode="auto"), "nftables": dict(mode="nftables"), "iptables": dict(mode="iptables")}

KILLER = r"""
import os, signal, sys
from interceptor.pod.podspec import PodSettings
from interceptor import pieces
from interceptor.ops import enrollment
import json
netns_path, when, victim, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
cls = type(pieces.BY_NAME[victim])
real = cls.apply

def apply(self, target, previous):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(self, target, previous)
    os.kill(os.getpid(), signal.SIGKILL)     # applied, not yet recorded
    return out

cls.apply = apply
enrollment.enroll(netns_path, PodSettings(**settings), pod="test/victim")
"""


@pytest.fixture(scope="module", params=list(MODES))
def mode(request):
    with loaded(**MODES[request.param]):
        yield request.param


@pytest.fixture
def pod(mode):
    with pods_lab("icj", NET) as lab:
        yield lab.add_pod("victim")


def netfilter(pod):
    """Every rule and chain in the pod's netns, nft and legacy iptables."""
    legacy = [line for tool in ("iptables-legacy-save", "ip6tables-legacy-save")
              for line in pod.run(tool, "-t", "nat", check=False).stdout.splitlines()
              if line.startswith("-A ") or line.endswith(" - [0:0]")]
    return pod.run("nft", "list", "ruleset", check=False).stdout, legacy


def map_entries_of(cookie):
    """{map name: count} of entries that belong to this cookie, in every map."""
    out = {}
    try:
        maps = Maps().open_all()
    except OSError:
        return out      # rules modes load no maps
    with maps:
        for name in LAYOUT:
            if name in SK_STORAGE + SINGLE_SLOT or name == "bypass_socks":
                continue
            m = getattr(maps, name)
            if name in ("pods", "xdp_pods"):
                n = sum(k.value == cookie for k in m.keys())
            elif name == "pod_addrs":
                n = sum(v.value == cookie for _, v in m.items())
            elif name == "redirected":
                n = sum(v.netns_cookie == cookie for _, v in m.items())
            else:
                n = len(m.pod_keys(cookie))
            if n:
                out[name] = n
    return out


def lo_has_inbound_source(pod):
    return f" {abi.INBOUND_SOURCE_V6}/128 " in pod.run("ip", "-6", "addr", "show", "dev", "lo").stdout


def assert_nothing_left(pod, cookie, before):
    assert podrecord.read(cookie) is None
    assert not lo_has_inbound_source(pod)
    assert not os.path.exists(paths.pod_pin_dir(cookie))
    assert map_entries_of(cookie) == {}
    assert netfilter(pod) == before


def victim_piece(names, victim):
    return {"inbound-source": names[0], "filter": names[1], "capture": names[-1]}[victim]


def kill_enroll_at(pod, when, victim):
    p = subprocess.run([sys.executable, "-c", KILLER, pod.netns_path, when, victim, json.dumps(SETTINGS)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr


def test_each_mode_serves_pods_with_its_pieces_in_order(pod, mode):
    expected = {"ebpf": ["inbound-source", "filter-xdp", "capture-bpf"],
                "nftables": ["inbound-source", "filter-nftables", "capture-rules"],
                "iptables": ["inbound-source", "filter-nftables", "capture-rules"]}[mode]
    assert list(node_state.node_plan().pieces) == expected
    rec = enrollment.enroll(pod.netns_path, PodSettings(**SETTINGS), pod="test/victim")
    assert [e.piece for e in rec.journal] == expected and rec.complete
    assert all(e.state is not None for e in rec.journal)
    assert status.collect()["pods"][0]["pieces"] == expected
    assert lo_has_inbound_source(pod)
    # the filter can be turned off per pod: its piece is removed on re-enroll
    rec = enrollment.enroll(pod.netns_path, PodSettings(ingress_filter="off"), pod="test/victim")
    assert [e.piece for e in rec.journal] == [expected[0], expected[2]]
    assert not enrollment.verify(rec, pod.netns_path)
    cookie = rec.cookie
    if mode == "ebpf":
        assert "xdp_pods" not in map_entries_of(cookie)
    else:
        assert "interceptor_ingress" not in netfilter(pod)[0]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("victim", ["inbound-source", "filter", "capture"])
def test_killed_at_a_piece_boundary_then_del_leaves_nothing(pod, mode, when, victim):
    """'before': the piece is journalled, nothing of it made; 'after': all of it made,
    nothing of it recorded (so removal has to sweep)."""
    before = netfilter(pod)
    cookie = netns.cookie_of(pod.netns_path)
    names = list(node_state.node_plan().pieces)
    kill_enroll_at(pod, when, victim_piece(names, victim))

    rec = podrecord.read(cookie)
    assert rec is not None and not rec.complete
    problems = enrollment.verify(rec, pod.netns_path)
    assert problems[0].kind == Kind.INCOMPLETE
    report = status.collect()
    assert any("test/victim: enrollment incomplete" in e for e in report["errors"])

    assert enrollment.unenroll(netns_path=pod.netns_path) == [cookie]
    assert_nothing_left(pod, cookie, before)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("victim", ["inbound-source", "filter", "capture"])
def test_killed_at_a_piece_boundary_then_add_again_ends_healthy(pod, mode, when, victim):
    before = netfilter(pod)
    names = list(node_state.node_plan().pieces)
    kill_enroll_at(pod, when, victim_piece(names, victim))
    # the retried ADD: other settings, so nothing of the killed run may linger
    rec = enrollment.enroll(pod.netns_path, PodSettings(exclude_outbound_ports=[6379]), pod="test/victim")
    assert rec.complete and not enrollment.verify(rec, pod.netns_path)
    if mode == "ebpf":
        entries = map_entries_of(rec.cookie)
        with Maps() as maps:
            excluded = sorted(k.port for k in maps.port_rules.pod_keys(rec.cookie)
                              if k.kind == abi.PortKind.OUT_EXCLUDE)
            excluded_cidrs = [k for k in maps.cidr_rules.pod_keys(rec.cookie)
                              if k.kind == abi.CidrKind.OUT_EXCLUDE]
        assert excluded == [6379] and excluded_cidrs == [], entries
        assert "ingress_rules" not in entries and "ingress_sources" not in entries
    enrollment.unenroll(netns_path=pod.netns_path)
    assert_nothing_left(pod, rec.cookie, before)


def test_reenroll_changes_capture_in_place(pod, mode):
    """A settings change never passes through a state without the exclusions it keeps:
    new entries are written before stale ones go, and the pods entry stays."""
    if mode != "ebpf":
        pytest.skip("the rules are replaced in one transaction (nft) or one restore (iptables)")
    rec = enrollment.enroll(pod.netns_path, PodSettings(exclude_outbound_ports=[1, 2]), pod="test/victim")
    cookie = rec.cookie
    deleted = []
    with Maps() as maps:
        real_delete = type(maps.port_rules).delete

        def delete(self, key):
            if self.name == "port_rules":
                remaining = {k.port for k in self.pod_keys(cookie)
                             if k.kind == abi.PortKind.OUT_EXCLUDE} - {key.port}
                deleted.append((key.port, sorted(remaining)))
            if self.name == "pods":
                deleted.append(("pods", None))
            return real_delete(self, key)

        type(maps.port_rules).delete = delete
        try:
            enrollment.enroll(pod.netns_path, PodSettings(exclude_outbound_ports=[2, 3]), pod="test/victim")
        finally:
            type(maps.port_rules).delete = real_delete
    # only port 1 went, and when it did 2 and 3 were both in place; the pods entry stayed
    assert deleted == [(1, [2, 3])]
    with Maps() as maps:
        assert maps.pods.get(ctypes.c_uint64(cookie)) is not None


def test_a_record_of_the_previous_layout_is_verified_and_removed(pod, mode):
    """Records written by 0.1 (before the journal) kept each mechanism under its own key:
    an upgraded node reads them, verifies them and removes them completely."""
    before = netfilter(pod)
    rec = enrollment.enroll(pod.netns_path, PodSettings(**SETTINGS), pod="test/victim")
    old = rec.to_json()
    del old["journal"]
    piece, filt = pieces.filter_of(rec)
    old["ingress"] = dict(filt, mechanism=piece.mechanism)
    if mode != "ebpf":
        old["rules"] = rec.entry("capture-rules").state
    from interceptor import store
    store.write_json(paths.pod_state_file(rec.cookie), old)
    again = podrecord.read(rec.cookie)
    assert [e.piece for e in again.journal] == [e.piece for e in rec.journal]
    assert not enrollment.verify(again, pod.netns_path)
    enrollment.unenroll(netns_path=pod.netns_path)
    assert_nothing_left(pod, rec.cookie, before)


def test_a_damaged_record_is_reported_and_removable(pod, mode):
    before = netfilter(pod)
    rec = enrollment.enroll(pod.netns_path, PodSettings(**SETTINGS), pod="test/victim")
    with open(paths.pod_state_file(rec.cookie), "w") as f:
        f.write('{"cookie": ')       # cut short
    damaged = podrecord.read(rec.cookie)
    assert damaged.damaged and enrollment.verify(damaged)[0].kind == Kind.INCOMPLETE
    report = status.collect()
    assert any("unreadable" in e for e in report["errors"]), report["errors"]
    # the record lost the netns path, so nothing is known of the pod but its cookie
    assert enrollment.unenroll(cookie=rec.cookie) == [rec.cookie]
    assert podrecord.read(rec.cookie) is None and map_entries_of(rec.cookie) == {}
    # rules inside the netns could not be found without the path: a new ADD replaces
    # them and its DEL removes them (only the empty nat base chains iptables-nft made
    # for the first ADD stay: nothing says any more that they were ours)
    rec = enrollment.enroll(pod.netns_path, PodSettings(), pod="test/victim")
    enrollment.unenroll(netns_path=pod.netns_path)
    nft, legacy = netfilter(pod)
    assert "interceptor" not in nft.lower() and legacy == before[1]
    if mode != "iptables":
        assert_nothing_left(pod, rec.cookie, before)


ENROLL = ("import sys\nfrom interceptor.ops import enrollment\nfrom interceptor.pod.podspec import PodSettings\n"
          "import json\nenrollment.enroll(sys.argv[1], PodSettings(**json.loads(sys.argv[2])), pod='test/victim')\n")
UNENROLL = "import sys\nfrom interceptor.ops import enrollment\nenrollment.unenroll(netns_path=sys.argv[1])\n"


def _killed_after(code, args, delay):
    """Run code in a fresh process; SIGKILL it after delay seconds unless it ended."""
    return killed_after([sys.executable, "-c", code, *args], delay)


def test_enroll_and_unenroll_killed_at_random_points_converge(pod, mode):
    """SIGKILL at a random moment of an enroll or an unenroll, forty times (more under
    `make reliability`): whatever was left, the next unenroll leaves nothing and the
    next enroll ends healthy."""
    import random
    runs = int(os.environ.get("INTERCEPTOR_KILL_RUNS", 40))
    rng = random.Random(1234)
    before = netfilter(pod)
    cookie = netns.cookie_of(pod.netns_path)
    started = time.monotonic()
    _killed_after(ENROLL, [pod.netns_path, json.dumps(SETTINGS)], 60)
    full = time.monotonic() - started          # an enroll from a fresh process, start to end
    enrollment.unenroll(netns_path=pod.netns_path)
    killed = 0
    for i in range(runs):
        # most kills land in the enroll's own work, after the interpreter's start-up
        delay = rng.uniform(0.3 * full, full)
        if i % 2:
            enrollment.enroll(pod.netns_path, PodSettings(**SETTINGS), pod="test/victim")
            killed += _killed_after(UNENROLL, [pod.netns_path], delay)
        else:
            killed += _killed_after(ENROLL, [pod.netns_path, json.dumps(SETTINGS)], delay)
        rec = podrecord.read(cookie)
        if rec is not None and not rec.complete:
            assert enrollment.verify(rec, pod.netns_path)[0].kind == Kind.INCOMPLETE
        if i % 4 < 2:
            enrollment.unenroll(netns_path=pod.netns_path)
            assert_nothing_left(pod, cookie, before)
        else:
            rec = enrollment.enroll(pod.netns_path, PodSettings(**SETTINGS), pod="test/victim")
            assert rec.complete and not enrollment.verify(rec, pod.netns_path)
    print(f"{mode}: {killed} of {runs} runs killed before they finished (an enroll takes {full * 1000:.0f} ms from start)")
    assert killed >= runs // 4      # a good share of the runs really were cut short
    enrollment.unenroll(netns_path=pod.netns_path)
    assert_nothing_left(pod, cookie, before)
    publish_figures({"scenario": f"SIGKILL of enroll/unenroll at random points ({mode})",
                     "tried": {"runs": runs, "killed before finishing": killed}, "failures": 0,
                     "leftovers": {}})
