"""The plan from doctor's probes and the verifier's verdicts (no root: pure logic).

Each refused program takes its capability to the next mechanism down: eBPF capture to
REDIRECT rules, the XDP filter to tc, tc to XDP, both to nftables, then none; the bypass
to off. A forced eBPF mode refuses to load rather than fall back."""
import pytest

from interceptor.datapath.plan import Plan
from interceptor.datapath.programs import PROGRAMS
from interceptor import pieces
from interceptor.pieces import xdp
from interceptor.ops import capabilities, doctor
from interceptor.ops.capabilities import Probe


def report(missing=()):
    assert set(missing) <= set(Probe)
    return doctor.Report("test", [doctor.Check(n, n not in missing, "") for n in Probe])


def plan(refused=(), missing=(), mode="auto"):
    return capabilities.choose(mode, report(missing), {n: "the verifier said no" for n in refused})


# (refused programs, probes missing) -> (mode, outbound, inbound, sockmap, ingress, filter hooks)
TABLE = [
    ((), (), ("ebpf", "ebpf", "ebpf", True, "xdp", ["tc", "xdp"])),
    (("xdp_ingress",), (), ("ebpf", "ebpf", "ebpf", True, "xdp", ["tc"])),
    (("xdp_pod",), (), ("ebpf", "ebpf", "ebpf", True, "xdp", ["tc"])),
    (("tc_ingress",), (), ("ebpf", "ebpf", "ebpf", True, "xdp", ["xdp"])),
    (("tc_ingress",), ("xdp_native", "xdp_generic"), ("ebpf", "ebpf", "ebpf", True, "nftables", [])),
    (("tc_pod", "xdp_ingress"), (), ("ebpf", "ebpf", "ebpf", True, "nftables", [])),
    (("tc_pod", "xdp_ingress"), ("nftables",), ("ebpf", "ebpf", "ebpf", True, None, [])),
    ((), ("xdp_native", "xdp_generic"), ("ebpf", "ebpf", "ebpf", True, "xdp", ["tc"])),
    (("steer_inbound",), (), ("hybrid", "ebpf", "rules", True, "xdp", ["tc", "xdp"])),
    (("connect6",), (), ("hybrid", "rules", "ebpf", True, "xdp", ["tc", "xdp"])),
    (("getsockopt", "steer_inbound"), (), ("nftables", "rules", "rules", False, "xdp", ["tc", "xdp"])),
    (("sockops",), (), ("nftables", "rules", "rules", False, "xdp", ["tc", "xdp"])),
    (("msg_redirect",), (), ("ebpf", "ebpf", "ebpf", False, "xdp", ["tc", "xdp"])),
    # Linux 5.10: sock_ops and sockopt lack bpf_get_netns_cookie; the filter needs neither
    (("sockops", "getsockopt", "msg_redirect"), ("sock_ops", "getsockopt", "sockmap"),
     ("nftables", "rules", "rules", False, "xdp", ["tc", "xdp"])),
    ((), ("bpffs",), ("nftables", "rules", "rules", False, "nftables", [])),
]


@pytest.mark.parametrize("refused,missing,expected", TABLE)
def test_each_refusal_falls_to_the_next_mechanism(refused, missing, expected):
    p = plan(refused, missing)
    assert (p.mode, p.outbound, p.inbound, p.sockmap, p.ingress, list(p.filter_hooks)) == expected
    assert sorted(p.refused) == sorted(refused)
    assert len(p.fallbacks()) == len(refused)
    assert Plan.from_json(p.to_json()) == p          # recorded and read back, the same plan
    # the programs a load pins are exactly the accepted ones the plan needs
    assert not {prog.name for prog in PROGRAMS if prog.loaded(p)} & set(refused)


def test_a_fallback_line_names_the_program_the_reason_and_what_serves_instead():
    lines = plan(("xdp_ingress", "steer_inbound", "msg_redirect")).fallbacks()
    assert lines == [
        "the kernel refused msg_redirect (the verifier said no): no same-host bypass",
        "the kernel refused steer_inbound (the verifier said no): inbound capture on nftables rules",
        "the kernel refused xdp_ingress (the verifier said no): ingress filter on tc",
    ]


def test_forced_ebpf_mode_names_the_refused_capture_program():
    with pytest.raises(ValueError, match=r"getsockopt \(refused by the kernel: the verifier said no\)"):
        plan(("getsockopt",), mode="ebpf")
    assert plan(("xdp_ingress",), mode="ebpf").filter_hooks == ("tc",)     # the filter may fall back


def test_pieces_follow_the_plan():
    assert pieces.for_plan(plan(("sockops",))) == ["inbound-source", "filter-xdp", "capture-rules"]
    assert pieces.for_plan(plan(("tc_pod", "xdp_pod"))) == ["inbound-source", "filter-nftables", "capture-bpf"]


@pytest.mark.parametrize("asked,driver,hooks,hook", [
    ("auto", "veth", ["tc", "xdp"], "tc"), ("auto", "mlx5_core", ["tc", "xdp"], "xdp"),
    ("native", "veth", ["tc", "xdp"], "xdp"), ("native", "veth", ["tc"], "tc"),
    ("auto", "veth", ["xdp"], "xdp"), ("tc", "veth", ["xdp"], "xdp"), ("generic", "veth", ["tc"], "tc"),
])
def test_a_pod_asking_for_a_refused_hook_gets_the_other(asked, driver, hooks, hook):
    assert xdp.hook_for(asked, driver, hooks) == hook


def test_a_plan_recorded_before_filter_hooks_existed_has_both():
    old = Plan.from_json({"mode": "ebpf", "outbound": "ebpf", "inbound": "ebpf", "bypass": False,
                          "ingress": "xdp"})
    assert old.bpf_filter_hooks == ["tc", "xdp"] and old.filter_text() == "tc/xdp"
    assert old.fallbacks() == []
    assert old.sockmap          # (before sockmap was recorded, the bypass program was always loaded)


@pytest.mark.parametrize("doc,why", [
    ([], "plan is not an object"),
    ({"mode": "ebpf", "outbound": "ebpf"}, "plan without inbound"),
    ({"mode": "ebpf", "outbound": "ebpf", "inbound": 1}, "plan.inbound is int"),
    ({"mode": "ebpf", "outbound": "ebpf", "inbound": "ebpf", "bypass": 1}, "plan.bypass is int"),
    ({"mode": "ebpf", "outbound": "ebpf", "inbound": "magic"}, "plan.inbound is 'magic'"),
    ({"mode": "ebpf", "outbound": "ebpf", "inbound": "ebpf", "filter_hooks": ["tc", "ebpf"]},
     "plan.filter_hooks has 'ebpf'"),
])
def test_a_recorded_plan_that_is_not_one_says_why(doc, why):
    from interceptor.datapath import plan as planmod
    assert planmod.problem(doc) == why
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        Plan.from_json(doc)


def test_the_probes_doctor_runs_are_the_probes_the_plan_reads():
    """A probe doctor runs under another name than the plan asks for would leave it
    missing, and the node on rules, silently."""
    import inspect
    source = inspect.getsource(doctor.run)
    assert all(f"Probe.{p.name}" in source for p in Probe)


def test_the_verifier_reason_is_the_line_that_says_why():
    from interceptor.kernel.libbpf import verifier_reason
    log = """func#0 @0
0: R1=ctx() R10=fp0
0: (b7) r2 = -8                       ; R2_w=-8
1: (85) call bpf_xdp_adjust_meta#54
program of this type cannot use helper bpf_xdp_adjust_meta#54
processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
"""
    assert verifier_reason(log.splitlines()) == "program of this type cannot use helper bpf_xdp_adjust_meta#54"
    log = "0: (61) r2 = *(u32 *)(r1 +76)\ninvalid bpf_context access off=76 size=4\nprocessed 1 insns"
    assert verifier_reason(log.splitlines()) == "invalid bpf_context access off=76 size=4"
