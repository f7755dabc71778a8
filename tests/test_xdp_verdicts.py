"""The ingress filter's verdict logic on its own, on both hooks: test_ingress.py's
packet table run through BPF_PROG_TEST_RUN on a pod's XDP and tc programs (the per-pod
stubs, which tail-call the filter the loader verified), attached to nothing: no
namespace, veth or wire, so the whole table takes milliseconds. test_ingress.py proves
the same table end to end.

Each case's verdict is the program's return value, and exactly its counter moves: the
same on either hook.
"""
import errno
import os

import pytest

from interceptor import abi
from interceptor.kernel import libbpf
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state, pod_entries, stubs
from interceptor.datapath.maps import Maps
from interceptor.datapath.plan import Hook
from ingress_table import CASES, POLICY

pytestmark = [pytest.mark.kernel, pytest.mark.ingress_filter]

# hook -> (the stub, its return value for drop, for pass)
HOOKS = {"xdp": (stubs.XDP, 1, 2),                  # XDP_DROP, XDP_PASS
         "tc": (stubs.TC, 2, 0xFFFFFFFF)}           # TC_ACT_SHOT, TC_ACT_UNSPEC (-1)
COOKIE = 0x7E57C0DE00000001   # no namespace has it: cookies count up from 1


class NoWire:
    """What the table's builders need of a wire: two MAC addresses."""
    src_mac, dst_mac = "02:00:00:00:00:01", "02:00:00:00:00:02"


@pytest.fixture(scope="module", params=list(HOOKS))
def pod_program(request, datapath):
    """(hook, the program) of a pod that exists only in the maps, with test_ingress's
    policy."""
    if Hook(request.param) not in node_state.node_plan().bpf_filter_hooks:
        pytest.skip(f"this kernel refused the {request.param} filter (the plan says so)")
    with Maps() as maps:
        pod_entries.write_filter(maps, COOKIE, PodSettings(ingress_policy=POLICY), 32768)
    fd = stubs.load_for_pod(HOOKS[request.param][0], COOKIE)
    yield request.param, fd
    os.close(fd)       # the entries go with the maps when the datapath fixture unloads


def counts():
    with Maps() as maps:
        return {key.reason: sum(v.count for v in values) for key, values in maps.stats.items()
                if key.netns_cookie == COOKIE}


@pytest.mark.parametrize("desc,build,delivered,label", [c[:4] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_verdict(pod_program, desc, build, delivered, label):
    hook, fd = pod_program
    _, dropped, passed = HOOKS[hook]
    frame = build(NoWire, b"IC-MARK")
    before = counts()
    try:
        verdict, _ = libbpf.prog_test_run(fd, frame)
    except OSError as exc:
        if hook == "tc" and exc.errno == errno.EINVAL:
            # the kernel's skb test harness wants a whole IP header before it runs a
            # program; test_ingress.py puts these frames through the real tc hook
            pytest.skip("BPF_PROG_TEST_RUN builds no skb from a truncated IP header")
        raise
    assert verdict == (passed if delivered else dropped), desc
    after = counts()
    moved = {abi.Reason.name_of(r).lower(): after[r] - before.get(r, 0)
             for r in after if after[r] != before.get(r, 0)}
    assert moved == {label: 1}, desc
