"""Programs the kernel refuses: each capability falls back to the next mechanism down,
and doctor, status, the metrics and selfcheck say which program and why.

The kernel judges the datapath's real programs at load (interceptor/datapath/build.py). Where it
refuses one (a vendor or hardened build; this machine kind's build v1300 refuses
bpf_xdp_adjust_meta to every XDP program) the capability it serves runs another way.
INTERCEPTOR_REFUSE_PROGRAMS turns the verifier's answer into a refusal for the programs
named, so every fallback runs here whatever this kernel accepts; the first test asks the
kernel itself.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import enroll, loaded, pod_counters, pods_lab
from interceptor import abi, paths
from interceptor.kernel import libbpf, netns
from interceptor.datapath import build
from interceptor import pieces
from interceptor.ops import loader
from interceptor.harness import selfcheck

pytestmark = pytest.mark.kernel
CLI = [sys.executable, "-m", "interceptor.cli"]


def _xdp_adjust_meta_prog():
    """r2 = -8; call bpf_xdp_adjust_meta; r0 = XDP_PASS; exit"""
    insn = struct.Struct("<BBhi")
    return b"".join(insn.pack(*i) for i in ((0xb7, 0x02, 0, -8), (0x85, 0, 0, 54),
                                            (0xb7, 0, 0, 2), (0x95, 0, 0, 0)))


def test_this_kernel_judges_the_real_programs_and_the_load_uses_only_what_it_accepted():
    """Whatever this kernel refuses of the datapath is named with the verifier's reason in
    one line, and a load pins none of it. A helper refused by the kernel is named in the
    verifier's reason (bpf_xdp_adjust_meta, refused by some builds: the filter no longer
    calls it)."""
    refused = build.judge(netns.host_cookie())
    assert all(reason and "\n" not in reason for reason in refused.values()), refused
    try:
        os.close(libbpf.prog_load(libbpf.ProgType.XDP, "ic_meta", _xdp_adjust_meta_prog()))
    except libbpf.VerifierRejection as exc:
        assert "bpf_xdp_adjust_meta" in exc.reason, exc
    with loaded() as plan:
        assert plan.refused == refused
        assert not set(os.listdir(paths.PIN_PROGS)) & set(refused)


# refused programs -> what the plan serves instead (the fields that must change)
FALLBACKS = {
    "xdp_ingress": {"mode": "ebpf", "ingress": "xdp", "filter_hooks": ["tc"]},
    "xdp_pod": {"mode": "ebpf", "ingress": "xdp", "filter_hooks": ["tc"]},
    "tc_ingress": {"mode": "ebpf", "ingress": "xdp", "filter_hooks": ["xdp"]},
    "tc_pod,xdp_ingress": {"mode": "ebpf", "ingress": "nftables", "filter_hooks": []},
    "steer_inbound": {"mode": "hybrid", "outbound": "ebpf", "inbound": "rules"},
    "getsockopt": {"mode": "hybrid", "outbound": "rules", "inbound": "ebpf"},
    "sockops": {"mode": "nftables", "outbound": "rules", "inbound": "rules", "sockmap": False,
                "filter_hooks": ["tc", "xdp"]},
    "msg_redirect": {"mode": "ebpf", "sockmap": False, "bypass": False},
}


@pytest.mark.parametrize("refused", list(FALLBACKS))
def test_a_refused_program_falls_back_and_the_behavioural_core_still_holds(refused):
    """selfcheck (two pods with HAProxy sidecars: the request through both, each sidecar
    seeing the original destination, the ingress filter's drop of a connection to the
    proxy's port, status healthy, unload leaving nothing) on the fallback plan; the plan
    and every report name the refused program."""
    names = refused.split(",")
    env = dict(os.environ, **{build.REFUSE_ENV: refused})
    loader.unload()
    p = subprocess.run(CLI + ["selfcheck", "-o", "json"], env=env, capture_output=True, text=True,
                       timeout=300)
    result = json.loads(p.stdout)
    assert p.returncode == 0 and result["ok"], result
    plan = result["plan"]
    for key, value in FALLBACKS[refused].items():
        assert plan[key] == value, (key, plan)
    assert sorted(plan["refused"]) == sorted(names)
    load_step = next(s for s in result["steps"] if s["name"] == "load")
    assert all(f"the kernel refused {n}" in load_step["detail"] for n in names), load_step

    # doctor shows the plan load chose, and why
    d = json.loads(subprocess.run(CLI + ["doctor", "-o", "json"], env=env, capture_output=True,
                                  text=True).stdout)
    assert {k: d["plan"][k] for k in FALLBACKS[refused]} == FALLBACKS[refused]
    assert {x["name"] for x in d["programs"] if not x["accepted"]} == set(names)


@pytest.mark.parametrize("refused", ["steer_inbound", "getsockopt", "sockops"])
def test_envoy_as_istio_configures_it_on_each_capture_fallback(refused):
    """`selfcheck --proxy envoy` on the hybrid plans, where one direction's original
    destination comes from the datapath and the other's from conntrack: Envoy's own
    counters show each hop took its listener, route and cluster, and the self-call its
    inbound sidecar."""
    env = dict(os.environ, **{build.REFUSE_ENV: refused})
    loader.unload()
    p = subprocess.run(CLI + ["selfcheck", "--proxy", "envoy", "-o", "json"], env=env,
                       capture_output=True, text=True, timeout=300)
    result = json.loads(p.stdout)
    assert p.returncode == 0 and result["ok"], result
    assert result["proxy"] == "envoy" and result["plan"]["refused"] == {refused: result["plan"]["refused"][refused]}
    assert [s["name"] for s in result["steps"]] == list(selfcheck.ENVOY_STEPS)


def test_status_metrics_and_enroll_on_a_node_whose_kernel_refused_the_xdp_filter():
    """A pod that asks for XDP gets the tc filter, which judges alike (the drop is
    counted); status warns with the program and the reason, the metrics carry it."""
    from interceptor.ops import status
    from interceptor.agent import metrics
    with loaded(refused="xdp_ingress") as plan, pods_lab("icr", 81) as lab:
        assert plan.filter_hooks == ("tc",)
        assert "xdp_ingress" not in os.listdir(paths.PIN_PROGS)
        assert not os.path.exists(paths.XDP_TEMPLATE)
        pod, peer = lab.add_pod("target"), lab.add_pod("peer")
        rec = enroll(pod, ingress_filter="native")
        assert [a["mode"] for a in pieces.filter_of(rec)[1]["interfaces"]] == ["tc"]
        probe = peer.run("curl", "-sS", "-m", "2", f"http://{pod.ipv4}:{abi.OUTBOUND_PORT}/", check=False)
        assert probe.returncode != 0
        assert pod_counters(pod).get("ingress_dropped_protected_port", 0) > 0
        report = status.collect()
        assert report["node"]["refused"] == {"xdp_ingress": f"named in {build.REFUSE_ENV}"}
        assert any(w.startswith("the kernel refused xdp_ingress") and "ingress filter on tc" in w
                   for w in report["warnings"]), report["warnings"]
        assert not report["errors"], report["errors"]
        from prometheus_client import generate_latest
        from prometheus_client.core import CollectorRegistry
        registry = CollectorRegistry()
        registry.register(metrics.DatapathCollector())
        text = generate_latest(registry).decode()
        assert 'interceptor_datapath_program_refused{capability="ingress",program="xdp_ingress"' in text


def test_a_node_whose_kernel_refused_the_tc_filter_gives_a_veth_xdp():
    """tc refused: auto on a veth takes XDP (native first), and the filter judges."""
    with loaded(refused="tc_pod") as plan, pods_lab("icr", 82) as lab:
        assert plan.filter_hooks == ("xdp",)
        pod, peer = lab.add_pod("target"), lab.add_pod("peer")
        rec = enroll(pod)
        assert [a["mode"] for a in pieces.filter_of(rec)[1]["interfaces"]] == ["native"]
        probe = peer.run("curl", "-sS", "-m", "2", f"http://{pod.ipv4}:{abi.OUTBOUND_PORT}/", check=False)
        assert probe.returncode != 0
        assert pod_counters(pod).get("ingress_dropped_protected_port", 0) > 0


def test_an_upgrade_to_a_build_the_kernel_refuses_part_of_changes_nothing(tmp_path):
    """The loaded datapath uses the XDP filter; a new build whose xdp_ingress the kernel
    refuses is not swapped in: `interceptor upgrade` fails naming it, the programs in the
    links are the old ones, the pod stays captured."""
    from interceptor.datapath import bpf_source
    from interceptor.ops import enrollment
    copy = tmp_path / "bpf"
    shutil.copytree(bpf_source.BPF_DIR, copy)
    with open(copy / "sock_connect.c", "a") as f:
        f.write("\n#define INTERCEPTOR_TEST_BUILD 3      /* a changed build */\n")
    with loaded() as plan, pods_lab("icr", 83) as lab:
        assert "xdp" in plan.filter_hooks
        pod = lab.add_pod("target")
        rec = enroll(pod, ingress_filter="generic")
        before = libbpf.pinned_info(paths.link_pin("connect4"), libbpf.LinkInfo).prog_id
        env = dict(os.environ, INTERCEPTOR_BPF_DIR=str(copy), **{build.REFUSE_ENV: "xdp_ingress"})
        p = subprocess.run(CLI + ["upgrade"], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "refuses xdp_ingress" in p.stderr + p.stdout, p
        assert "Traceback" not in p.stderr
        assert libbpf.pinned_info(paths.link_pin("connect4"), libbpf.LinkInfo).prog_id == before
        assert not enrollment.verify(rec, pod.netns_path)
        # the same build without the refusal goes in, and the pod's XDP stub is renewed
        xdp_link = next(os.path.join(paths.pod_pin_dir(rec.cookie), n)
                        for n in os.listdir(paths.pod_pin_dir(rec.cookie)) if n.startswith("xdp_"))
        stub_before = libbpf.pinned_info(xdp_link, libbpf.LinkInfo).prog_id
        env.pop(build.REFUSE_ENV)
        p = subprocess.run(CLI + ["upgrade"], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p
        assert libbpf.pinned_info(paths.link_pin("connect4"), libbpf.LinkInfo).prog_id != before
        assert libbpf.pinned_info(xdp_link, libbpf.LinkInfo).prog_id != stub_before
        assert not enrollment.verify(rec, pod.netns_path)
