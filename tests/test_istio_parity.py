"""Do we capture what Istio captures? For every test case of istio-iptables' own suite,
the same probe grid (tests/istio_parity.py: outbound TCP by owner, destination and port,
DNS over UDP and TCP, inbound by interface and port, a VM's forwarded traffic; IPv4 and
IPv6) lands in the same place, with the same original destination, under Istio's rules
(its golden file, restored into the pod) and under our datapath in each mode, configured
through the one table of Istio's options (interceptor/pod/istio.py).

Where we differ on purpose, the difference is named (DELIBERATE) and counted, never
silently ignored; any other difference fails the case, listing the probes.
"""
import collections

import pytest

from conftest import MODES, loaded
from istio_parity import CASES, OWNERS, ProbeNet, config, istio_landings, over_lo
from interceptor import abi
from interceptor.pod import istio
from interceptor.pod.podspec import PodSettings
from interceptor.datapath import node_state
from interceptor.ops import enrollment

pytestmark = pytest.mark.kernel

# the golden files from a 2022 branch (one command per line; the owner-users cases)
# predate two of Istio's rules today: HBONE's port excepted from the proxy's self-call,
# and DNS's port exceptions only where there is a nameserver to capture
OLDER_GOLDENS = {c for c in CASES if "owner-users" in c}

_ISTIO = {}


def istio_rules(case):
    """Istio's landings, once per case for every mode."""
    if case not in _ISTIO:
        _ISTIO[case] = istio_landings(case)
    return _ISTIO[case]


@pytest.fixture(scope="module", params=list(MODES))
def datapath(request):
    load_mode, disabled = MODES[request.param]
    with loaded(disabled, mode=load_mode) as plan:
        yield plan


def our_landings(case):
    """The grid under our datapath, the pod enrolled with the case's configuration (the
    ingress filter off: its extra protection is not capture)."""
    settings = PodSettings(**istio.from_config(config(case)), ingress_filter="off")
    with ProbeNet(settings.proxy_uid[0], settings.proxy_gid[0]) as net:
        enrollment.enroll(net.path("P"), settings, pod=f"parity/{case}")
        try:
            return net.landings()
        finally:
            enrollment.unenroll(netns_path=net.path("P"))


def datapath_inbound_is_ebpf():
    return node_state.node_plan().inbound.value == "ebpf"


def deliberate(case, probe, theirs, ours):
    """The name of the deliberate difference this probe shows, or None."""
    cfg = config(case)
    ns, owner, proto, host, port = probe
    settings = PodSettings(**istio.from_config(cfg))
    uid, gid, _ = OWNERS[owner]
    if ":" in host and not cfg.get("EnableIPv6"):
        return "IPv6 served though Istio's case leaves it unconfigured (EnableIPv6 false)"
    if ns == "P" and proto == "tcp" and over_lo(host) and port in (settings.outbound_port, settings.inbound_port) \
            and (uid in settings.proxy_uid or gid in settings.proxy_gid):
        return "the proxy's connection to its own capture port over lo is never redirected (eBPF: refused)"
    if ns != "P" and port in {settings.outbound_port, settings.inbound_port, *abi.ALWAYS_EXCLUDED_INBOUND_PORTS} \
            and theirs[0] == "P:15006" and ours[0] == f"P:{port}":
        return "inbound to the proxy's own ports and 15020/15021/15090 is never steered"
    tproxy = cfg.get("InboundInterceptionMode") == "TPROXY"
    if tproxy and ns == "P" and over_lo(host) and theirs[0] == "P:15006" \
            and (uid in settings.proxy_uid or gid in settings.proxy_gid):
        return ("TPROXY is served as REDIRECT: Istio's TPROXY rules steer every connection of the "
                "proxy's uid or gid to its pod over lo inbound (HBONE's and DNS's ports too)")
    if tproxy and ns != "P" and port == abi.HBONE_PORT and theirs[0] == "P:15006":
        return "TPROXY is served as REDIRECT: Istio's TPROXY rules steer inbound HBONE too"
    if ns == "V" and not over_lo(host) and theirs[0] == "P:15006" and ours[0] != "P:15006" \
            and datapath_inbound_is_ebpf():
        return ("traffic routed through the pod, not to it, is not steered inbound under eBPF "
                "(sk_lookup sees connections to the pod; a VM's are reroute_interfaces')")
    if case in OLDER_GOLDENS and ns == "P" and over_lo(host) and port in (abi.HBONE_PORT, abi.DNS_SERVER_PORT) \
            and (uid in settings.proxy_uid or gid in settings.proxy_gid):
        return "the golden file is from a 2022 branch: the self-call's HBONE and DNS exceptions differ"
    return None


def compare(case, ours):
    theirs_all = istio_rules(case)
    named, unexplained = collections.Counter(), []
    for probe, theirs in theirs_all.items():
        mine = ours[probe]
        if mine == theirs:
            continue
        why = deliberate(case, probe, theirs, mine)
        if why:
            named[why] += 1
        else:
            unexplained.append((probe, theirs, mine))
    return named, unexplained


@pytest.mark.parametrize("case", sorted(CASES))
def test_captures_equal_istios(datapath, case):
    ours = our_landings(case)
    named, unexplained = compare(case, ours)
    total = len(ours)
    print(f"{case} ({datapath.mode}): {total} probes, {total - sum(named.values()) - len(unexplained)} "
          f"alike, {dict(named)} deliberate, {len(unexplained)} unexplained")
    assert not unexplained, "\n".join(f"{p}: istio {t}, ours {o}" for p, t, o in unexplained[:40]) + \
        f"\n({len(unexplained)} probes differ)"


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
def test_a_socket_carrying_the_skip_mark_is_never_redirected(datapath, family):
    """ambient's ztunnel marks its sockets 0x539/0xfff: one setting, every mode."""
    settings = PodSettings(include_outbound_cidrs="*", skip_mark="0x539/0xfff", ingress_filter="off")
    host = "20.0.0.5" if family == 4 else "fd00::5"
    with ProbeNet() as net:
        enrollment.enroll(net.path("P"), settings, pod="parity/mark")
        try:
            marked = net.batch("P", "root", [("tcp", host, 80)], [41000], mark=0x1539)
            other_mark = net.batch("P", "root", [("tcp", host, 80)], [41001], mark=0x53a)
            unmarked = net.batch("P", "root", [("tcp", host, 80)], [41002])
        finally:
            enrollment.unenroll(netns_path=net.path("P"))
    assert marked == [("W:9", f"{host}|80")]
    assert other_mark[0][0] == unmarked[0][0] == "P:15001"
