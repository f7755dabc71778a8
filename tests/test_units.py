"""Pure logic: no kernel, no root."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from interceptor import abi, bpf_source
from interceptor.cli import main
from interceptor.enrollment import PodSettings, parse_cidrs


def test_committed_abi_header_is_current():
    with open(bpf_source.BPF_DIR / "lib" / "abi.h") as f:
        assert f.read() == abi.render_header(), "run `make abi`"


def test_assemble_inlines_each_local_header_once():
    text = bpf_source.assemble()
    assert text.count('#line 1 "bpf/lib/maps.h"') == 1
    assert text.count('#line 1 "bpf/lib/helpers.h"') == 1
    for name in bpf_source.HOOK_FILES:
        assert f'#line 1 "bpf/{name}"' in text
    assert "#include \"" not in text


def test_reason_codes_are_unique_and_stable():
    values = [v for _, v in abi.Reason.items()]
    assert len(values) == len(set(values))
    assert abi.Reason.OUT_REDIRECTED == 1    # renumbering breaks dashboards


@pytest.mark.parametrize("field,value,message", [
    ("outbound_port", 0, "outbound_port: 0 is not in 1-65535"),
    ("inbound_port", "x", "inbound_port: 'x' is not a port number"),
    ("exclude_outbound_cidrs", ["10.0.0.0/33"], "exclude_outbound_cidrs: '10.0.0.0/33' is not a CIDR"),
    ("exclude_inbound_ports", "80,http", "exclude_inbound_ports: 'http' is not a port number"),
    ("no_proxy", "drop", "no_proxy: 'drop' is not 'reject' or 'passthrough'"),
    ("proxy_uid", -1, "proxy_uid: -1 is not a uid/gid"),
])
def test_settings_errors_name_the_setting(field, value, message):
    with pytest.raises(ValueError) as err:
        PodSettings(**{field: value}).validate()
    assert str(err.value) == message


def test_settings_normalise():
    s = PodSettings(exclude_outbound_ports="443, 80,80", include_outbound_cidrs="10.1.2.3/8",
                    include_inbound_ports="*").validate()
    assert s.exclude_outbound_ports == [80, 443]
    assert s.include_outbound_cidrs == ["10.0.0.0/8"]
    assert s.include_inbound_ports == ["*"]
    assert s.flags() & abi.POD_F_BYPASS
    assert not s.flags() & abi.POD_F_IN_PORTS_INCLUDE


def test_star_is_both_families():
    assert [str(n) for n in parse_cidrs("*", "x")] == ["0.0.0.0/0", "::/0"]
    assert parse_cidrs("", "x") == []


@pytest.mark.parametrize("argv", [
    ["enroll"],                                            # --netns missing
    ["enroll", "--netns", "/proc/self/ns/net", "--pod", "noslash"],
    ["enroll", "--netns", "/proc/self/ns/net", "--outbound-port", "70000"],
    ["enroll", "--netns", "/proc/self/ns/net", "--exclude-outbound-cidrs", "nope"],
    ["enroll", "--netns", "/proc/self/ns/net", "--no-proxy", "maybe"],
    ["unenroll"],
    ["load", "--bogus"],
    ["status", "-o", "yaml"],
])
def test_bad_flags_are_usage_errors(argv):
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output


def test_cni_plugin_answers_version_without_config():
    out = subprocess.run([sys.executable, "-m", "interceptor.cni"], capture_output=True, text=True,
                         env={"CNI_COMMAND": "VERSION"})
    assert out.returncode == 0
    assert '"supportedVersions"' in out.stdout
