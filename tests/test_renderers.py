"""What the rule renderers write, against golden files (no root, no kernel): the
nftables script and iptables-restore input of the capture rules per pod setting, and
the nftables netdev ingress filter. A changed rule is a changed golden file, read in
review; `UPDATE_GOLDEN=1 make unit` rewrites them.

The rules themselves are exercised in the pods' namespaces by tests/test_datapath.py
and tests/test_ingress.py; here, their text."""
import os
import pathlib

import pytest

from interceptor.kernel import rules
from interceptor.pod import ingress_policy
from interceptor.pod.podspec import PodSettings
from interceptor.pieces import ingress_nft

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "rules"
BOTH = (rules.OUTBOUND, rules.INBOUND)

# name -> (the pod's settings, the directions on rules)
CAPTURE = {
    "defaults": (PodSettings(), BOTH),
    "outbound-only": (PodSettings(), (rules.OUTBOUND,)),
    "inbound-only": (PodSettings(), (rules.INBOUND,)),
    "exclusions": (PodSettings(exclude_outbound_cidrs="10.96.0.0/12,fd00::/8",
                               exclude_outbound_ports="5432,6379", exclude_inbound_ports="9090"), BOTH),
    "include-lists": (PodSettings(include_outbound_cidrs="10.0.0.0/8", include_outbound_ports="80,443",
                                  include_inbound_ports="8080,9000"), BOTH),
    "own-ports-and-ids": (PodSettings(proxy_uid=1500, proxy_gid=1500, outbound_port=16001,
                                      inbound_port=16006), BOTH),
}


def check(name, text):
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path} (UPDATE_GOLDEN=1 writes it)"
    assert text == path.read_text(), f"{name} differs from its golden file"


@pytest.mark.parametrize("case", list(CAPTURE))
def test_capture_rules_as_nftables_writes_them(case):
    settings, directions = CAPTURE[case]
    check(f"{case}.nft", rules.nft_script(settings, directions))


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("case", list(CAPTURE))
def test_capture_rules_as_iptables_restore_reads_them(case, version):
    settings, directions = CAPTURE[case]
    check(f"{case}.iptables{version}", rules.iptables_restore_input(settings, directions, version))


def test_the_nftables_ingress_filter_with_protected_ports_and_a_policy():
    policy = ingress_policy.parse_rules(["deny from 10.9.0.0/16", "allow from 10.1.0.0/16 tcp port 8080",
                                         "allow udp port 53"])
    check("ingress-filter.nft", ingress_nft.script(["eth0", "net1"], [15001, 15006, 15090], policy, 32768))


def test_status_renders_a_report_as_its_golden_text():
    """`interceptor status` from a report `status -o json` gave (two enrolled pods with a
    connection held open: tests/test_observability.py writes the fixture)."""
    import json
    from interceptor.ops import status
    report = json.loads((GOLDEN.parent / "status-report.json").read_text())
    check("../status-from-report.txt", status.render(report))
