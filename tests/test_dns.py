"""DNS capture end to end, in every mode: a real DNS proxy in the pod (dnsmasq on 15053,
run as the proxy's uid, as istio-agent's is) forwarding to a real DNS server in another
namespace (dnsmasq), asked by real clients (the C library's resolver through getent,
and dig), over UDP and TCP, to an IPv4 and an IPv6 nameserver.

What is asserted is what the DNS proxy itself saw (its query log), never only that the
client got an answer: without capture the client gets the same answer from the server.
"""
import os
import re
import subprocess
import time

import pytest

from conftest import MODES, enroll, loaded, pod_counters
from interceptor import abi
from interceptor.ops import enrollment

pytestmark = pytest.mark.kernel

NAME, V4, V6 = "web.svc.test", "10.1.2.3", "fd00::1:2:3"
APP_UID = 1000


@pytest.fixture(scope="module", params=list(MODES))
def datapath(request):
    load_mode, disabled = MODES[request.param]
    with loaded(disabled, mode=load_mode) as plan:
        yield plan


def start_dnsmasq(lab, pod, name, args, owner=None):
    """dnsmasq in the pod (as owner (uid, gid) when given); its query log's path."""
    log = os.path.join(lab.workdir, f"dnsmasq-{name}.log")
    argv = ["dnsmasq", "-k", "--bind-interfaces", "--no-resolv", "--no-hosts", "--cache-size=0",
            "--log-queries", f"--log-facility={log}", "--pid-file=", "--user=", *args]
    if owner:
        argv = ["setpriv", f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups", *argv]
    open(log, "w").close()
    os.chmod(log, 0o666)
    pod.spawn(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "started" not in open(log).read():
        assert time.monotonic() < deadline, f"dnsmasq {name} did not start"
        time.sleep(0.05)
    return log


def queries(log):
    """[(name, from)] of the queries dnsmasq logged."""
    return re.findall(r"query\[\w+\] (\S+) from (\S+)", open(log).read())


@pytest.fixture
def dns(datapath, lab):
    """a: the enrolled pod, with its DNS proxy; srv: the nameserver (not enrolled)."""
    a, srv = lab.add_pod("a"), lab.add_pod("dns")
    server_log = start_dnsmasq(lab, srv, "server", [
        f"--listen-address={srv.ipv4},{srv.ipv6}", "--port=53", f"--host-record={NAME},{V4},{V6}"])
    proxy_log = start_dnsmasq(lab, a, "proxy", [
        "--listen-address=127.0.0.1,::1", f"--port={abi.DNS_PORT}", f"--server={srv.ipv4}"],
        owner=(abi.PROXY_UID, abi.PROXY_GID))
    enroll(a, redirect_dns=True)
    resolv_dir = f"/etc/netns/{a.netns}"          # `ip netns exec` mounts it over /etc/resolv.conf
    os.makedirs(resolv_dir, exist_ok=True)
    yield a, srv, proxy_log, server_log, os.path.join(resolv_dir, "resolv.conf")
    subprocess.run(["rm", "-rf", resolv_dir], check=False)


def from_the_pod(pod, log):
    """The queries the DNS proxy got from inside the pod: from loopback (eBPF sends
    them there) or the pod's own address (REDIRECT keeps the source)."""
    own = {"127.0.0.1", "::1", str(pod.ipv4), str(pod.ipv6)}
    return [name for name, frm in queries(log) if frm in own]


def as_app(pod, *argv):
    return pod.run("setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups", *argv,
                   check=False)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("family", [4, 6], ids=["v4-nameserver", "v6-nameserver"])
def test_the_c_library_resolver_asks_the_dns_proxy(dns, family, transport):
    a, srv, proxy_log, server_log, resolv = dns
    nameserver = srv.ipv4 if family == 4 else srv.ipv6
    with open(resolv, "w") as f:
        f.write(f"nameserver {nameserver}\n" + ("options use-vc\n" if transport == "tcp" else ""))
    out = as_app(a, "getent", "ahostsv4", NAME)
    assert out.returncode == 0 and V4 in out.stdout, out
    # the proxy saw the app's query, and asked the server itself
    assert NAME in from_the_pod(a, proxy_log)
    assert (NAME, str(a.ipv4)) in queries(server_log)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("family", [4, 6], ids=["v4-nameserver", "v6-nameserver"])
def test_dig_asks_the_dns_proxy_and_sees_the_nameserver_answer(dns, family, transport):
    a, srv, proxy_log, _, _ = dns
    nameserver = srv.ipv4 if family == 4 else srv.ipv6
    argv = ["dig", f"@{nameserver}", NAME, "AAAA", "+tries=1", "+time=3"] + (["+tcp"] if transport == "tcp" else [])
    out = as_app(a, *argv)
    assert out.returncode == 0 and V6 in out.stdout, out.stdout
    # dig names the server the answer came from: the nameserver it asked, not the proxy
    assert re.search(rf"SERVER: {re.escape(str(nameserver))}#53\(", out.stdout), out.stdout
    assert NAME in from_the_pod(a, proxy_log)
    counters = pod_counters(a)
    assert counters.get("out_dns_redirected", 0) >= 1, counters


def test_the_proxys_own_queries_are_left_alone(dns):
    a, srv, proxy_log, server_log, _ = dns
    out = a.run("setpriv", f"--reuid={abi.PROXY_UID}", f"--regid={abi.PROXY_GID}", "--clear-groups",
                "dig", f"@{srv.ipv4}", NAME, "+short", "+tries=1", "+time=3", check=False)
    assert V4 in out.stdout, out
    assert queries(proxy_log) == []
    assert (NAME, str(a.ipv4)) in queries(server_log)


def test_without_dns_capture_queries_go_to_the_server(dns):
    """The control: the same query from a pod enrolled without redirect_dns never
    reaches the proxy."""
    a, srv, proxy_log, server_log, _ = dns
    enroll(a, redirect_dns=False)
    out = as_app(a, "dig", f"@{srv.ipv4}", NAME, "+short", "+tries=1", "+time=3")
    assert V4 in out.stdout, out
    assert queries(proxy_log) == []


def test_unenroll_leaves_no_rule_and_no_table_behind(dns):
    """DNS capture's conntrack zones live in the raw tables: unenroll takes them away
    with the rest (and iptables-nft's nat and raw tables it made)."""
    a, *_ = dns
    enrollment.unenroll(netns_path=a.netns_path)
    assert a.run("nft", "list", "ruleset", check=False).stdout == ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        assert "INTERCEPTOR" not in a.run(tool, check=False).stdout
