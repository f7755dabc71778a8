"""What keeps older kernels (the VM matrix's 5.10, vm/matrix.py) working, checked on this
one: the netns cookie learned through a BPF connect hook where SO_NETNS_COOKIE is missing
(before 5.14), and the selfcheck the matrix runs in each guest."""
import json
import os
import subprocess
import sys

import pytest

from interceptor.kernel import netns, netns_cookie_bpf
from interceptor.datapath import node_state
from interceptor.harness import selfcheck
from conftest import bpftool

pytestmark = pytest.mark.kernel


@pytest.fixture
def scratch_netns():
    name = f"icck{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_the_bpf_cookie_probe_gives_the_kernels_cookie(scratch_netns):
    """Same answer as SO_NETNS_COOKIE, in the host's namespace and in a fresh one whose
    loopback is down (its connect fails, after the hook ran)."""
    assert netns_cookie_bpf.current_cookie() == netns.current_cookie()
    with netns.entered(scratch_netns):
        inside = netns.current_cookie()
        assert netns_cookie_bpf.current_cookie() == inside
    assert inside != netns.current_cookie()


def test_the_bpf_cookie_probe_leaves_nothing_attached():
    for _ in range(3):
        netns_cookie_bpf.current_cookie()
    assert [p for p in bpftool("prog", "show") if p.get("name") == "ic_netns_cookie"] == []


def test_selfcheck_passes_on_this_kernel_in_each_mode():
    """The matrix's check, run here: every step of the behavioural core ok, and unload
    leaves nothing (its last step)."""
    from interceptor.ops import loader
    loader.unload()          # selfcheck refuses a loaded node
    for mode in ("auto", "nftables"):
        p = subprocess.run([sys.executable, "-m", "interceptor.cli", "selfcheck", "--mode", mode,
                            "-o", "json"], capture_output=True, text=True, timeout=300)
        result = json.loads(p.stdout)
        assert p.returncode == 0, result
        assert tuple(s["name"] for s in result["steps"]) == selfcheck.STEPS
        assert result["ok"] and result["plan"]["mode"] == ("ebpf" if mode == "auto" else mode)


def test_a_selfcheck_killed_half_way_is_cleaned_up_by_the_next():
    """SIGKILL once its pods are enrolled: the next selfcheck removes the lab it left
    (namespaces, sidecars, the datapath serving only its pods), then passes."""
    import signal
    import time
    from interceptor.pod import podrecord
    from interceptor.ops import loader, residue
    loader.unload()
    cli = [sys.executable, "-m", "interceptor.cli", "selfcheck", "-o", "json"]
    victim = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(podrecord.all_records()) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert node_state.is_loaded() and os.path.exists(f"/run/netns/{selfcheck.LAB_PREFIX}-server")
    p = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "interrupted selfcheck" in p.stderr
    assert [n for n in os.listdir("/run/netns") if n.startswith(selfcheck.LAB_PREFIX)] == []
    assert residue.after_unload().empty
