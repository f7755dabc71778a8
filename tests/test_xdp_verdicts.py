"""The ingress filter's verdict logic on its own: test_ingress.py's packet table run
through BPF_PROG_TEST_RUN on a pod's XDP program (the per-pod stub, which tail-calls the
filter the loader verified), attached to nothing: no namespace, veth or wire, so the
whole table takes milliseconds. test_ingress.py proves the same table end to end.

Each case's verdict is the program's return value, and exactly its counter moves.
"""
import os

import pytest

from interceptor import abi, ingress, libbpf, loader, xdp
from interceptor.maps import Maps
from interceptor.podspec import PodSettings
from test_ingress import CASES, POLICY

pytestmark = pytest.mark.kernel

XDP_DROP, XDP_PASS = 1, 2
COOKIE = 0x7E57C0DE00000001   # no namespace has it: cookies count up from 1


class NoWire:
    """What the table's builders need of a wire: two MAC addresses."""
    src_mac, dst_mac = "02:00:00:00:00:01", "02:00:00:00:00:02"


@pytest.fixture(scope="module")
def pod_program(datapath):
    """The XDP program of a pod that exists only in the maps, with test_ingress's policy."""
    if loader.node_plan()["ingress"] != "xdp":
        pytest.skip("no XDP on this kernel")
    with Maps() as maps:
        ingress.write_entries(maps, COOKIE, PodSettings(ingress_policy=POLICY), 32768)
    fd = xdp.load_for_pod(COOKIE)
    yield fd
    os.close(fd)       # the entries go with the maps when the datapath fixture unloads


def counts():
    with Maps() as maps:
        return {key.reason: sum(v.count for v in values) for key, values in maps.stats.items()
                if key.netns_cookie == COOKIE}


@pytest.mark.parametrize("desc,build,delivered,label", [c[:4] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_verdict(pod_program, desc, build, delivered, label):
    frame = build(NoWire, b"IC-MARK")
    before = counts()
    verdict, _ = libbpf.prog_test_run(pod_program, frame)
    assert verdict == (XDP_PASS if delivered else XDP_DROP), desc
    after = counts()
    moved = {abi.Reason.name_of(r).lower(): after[r] - before.get(r, 0)
             for r in after if after[r] != before.get(r, 0)}
    assert moved == {label: 1}, desc
