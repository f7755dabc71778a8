"""Pure logic: no kernel, no root."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from interceptor import abi
from interceptor.pod import parsing, podspec
from interceptor.pod.podspec import PodSettings, SettingError
from interceptor.datapath import bpf_source
from interceptor.cni import config as cni_config
from interceptor.cli import main


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
    with pytest.raises(SettingError) as err:
        PodSettings(**{field: value})
    assert str(err.value) == message
    assert err.value.field.name == field


def test_settings_normalise():
    s = PodSettings(exclude_outbound_ports="443, 80,80", include_outbound_cidrs="10.1.2.3/8",
                    include_inbound_ports="*")
    assert s.exclude_outbound_ports == [80, 443]
    assert [str(n) for n in s.include_outbound_cidrs] == ["10.0.0.0/8"]
    assert s.to_dict()["include_outbound_cidrs"] == ["10.0.0.0/8"]
    assert s.steers_all_inbound
    assert s.flags() & abi.POD_F_BYPASS
    assert not s.flags() & abi.POD_F_IN_PORTS_INCLUDE


def test_the_plugin_entry_lists_every_setting_with_its_default():
    """deploy/cni/interceptor-entry.json is the operator's reference: every config key of the
    table, at its default."""
    entry = json.loads((pathlib.Path(bpf_source.BPF_DIR).parent / "deploy" / "cni" / "interceptor-entry.json").read_text())
    plugin_keys = {"type", "capabilities", "excludeNamespaces", "sidecarMarker",
                   "enrollWithoutNamespace", "logFile", "pinRoot", "runDir"}
    assert set(entry) - plugin_keys == set(podspec.BY_CONFIG_KEY)
    from_entry = cni_config.decide(entry, {}).settings
    assert from_entry.to_dict() == PodSettings().to_dict()


def test_every_setting_is_an_enroll_flag():
    flags = {opt for p in main.commands["enroll"].params for opt in p.opts}
    assert {f.flag for f in podspec.FIELDS} <= flags


HOSTILE = [None, True, 1.5, -1, 2**70, "", "x" * 10000, "\udcff", {}, {"a": 1}, [], [[]],
           [{}], ["1", None], [True], "1,,2", "*", "0.0.0.0/0, nope", "deny from 1.2.3.4/40",
           [{"action": [], "protocol": {}}], [{"action": "deny", "port": [80]}], [{"from": 5}]]


@pytest.mark.parametrize("field", podspec.FIELDS, ids=lambda f: f.name)
def test_any_json_value_either_parses_or_is_a_setting_error(field):
    """Config keys and annotations arrive as any JSON type: each value is a setting or a
    SettingError naming its field, never another exception (a traceback in the plugin)."""
    for value in HOSTILE:
        try:
            PodSettings(**{field.name: value})
        except SettingError as exc:
            assert exc.field in (field, podspec.BY_NAME["inbound_port"]), (value, exc)


def test_a_record_reads_back_as_the_same_settings():
    s = PodSettings(exclude_outbound_cidrs="10.0.0.0/8,fd00::/8", include_inbound_ports="80,81",
                    ingress_policy=["deny from 10.0.0.0/8 tcp port 22"], bypass="false")
    assert PodSettings(**json.loads(json.dumps(s.to_dict()))).to_dict() == s.to_dict()
    assert s.bypass == () and not s.steers_all_inbound


@pytest.mark.parametrize("raw,legs,flags", [
    (True, ("outbound", "mesh", "inbound"), abi.POD_F_BYPASS),
    ("false", (), 0),
    ("mesh", ("mesh",), abi.POD_F_BYPASS_MESH),
    ("inbound, outbound", ("outbound", "inbound"), abi.POD_F_BYPASS_OUTBOUND | abi.POD_F_BYPASS_INBOUND),
    (["inbound", "mesh", "outbound"], ("outbound", "mesh", "inbound"), abi.POD_F_BYPASS),
])
def test_bypass_legs(raw, legs, flags):
    """true/false or a list of legs; every leg is the flag records from before legs carry,
    and a record keeps true/false so an older build reads it."""
    s = PodSettings(bypass=raw)
    assert s.bypass == legs and s.flags() & 0b1110010 == flags
    assert s.to_dict()["bypass"] == (list(legs) if 0 < len(legs) < 3 else bool(legs))
    assert PodSettings(**s.to_dict()).bypass == legs


@pytest.mark.parametrize("raw", ["", "sideways", "mesh,sideways", [True], {"mesh": 1}])
def test_bypass_legs_refused(raw):
    with pytest.raises(SettingError, match="^bypass: "):
        PodSettings(bypass=raw)


@pytest.mark.root
def test_enroll_refuses_an_unknown_bypass_leg_before_doing_anything():
    result = CliRunner().invoke(main, ["enroll", "--netns", "/proc/self/ns/net", "--bypass",
                                       "sideways"])
    assert result.exit_code == 2 and "Invalid value for --bypass: 'sideways'" in result.output, result.output


def test_cni_errors_name_the_key_or_annotation():
    with pytest.raises(cni_config.ConfigError, match="^config excludeOutboundPorts: 'ssh' is not a port"):
        cni_config.decide({"excludeOutboundPorts": "22,ssh"}, {})
    annotations = {"runtimeConfig": {cni_config.ANNOTATIONS_CAPABILITY: {
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/99"}}}
    with pytest.raises(cni_config.ConfigError,
                       match="^annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: '10.0.0.0/99'"):
        cni_config.decide(annotations, {})
    ok = {"excludeInboundPorts": [9000], "runtimeConfig": {cni_config.ANNOTATIONS_CAPABILITY: {
        "status.sidecar.istio.io/port": "15020", "interceptor.io/bypass": "false"}}}
    s = cni_config.decide(ok, {}).settings
    assert s.exclude_inbound_ports == [9000, 15020] and s.bypass == ()


def test_star_is_both_families():
    assert [str(n) for n in parsing.cidrs("*")] == ["0.0.0.0/0", "::/0"]
    assert parsing.cidrs("") == []


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
@pytest.mark.root
def test_bad_flags_are_usage_errors(argv):
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output


def test_cni_plugin_answers_version_without_config():
    out = subprocess.run([sys.executable, "-m", "interceptor.cni.plugin"], capture_output=True, text=True,
                         env={"CNI_COMMAND": "VERSION"})
    assert out.returncode == 0
    assert '"supportedVersions"' in out.stdout


# --- ingress policy (interceptor/pod/ingress_policy.py) ---------------------------------------
from interceptor.pod import ingress_policy  # noqa: E402
from interceptor.pieces import ingress_nft


@pytest.mark.parametrize("text,rule", [
    ("deny from 10.0.0.0/8 tcp port 22",
     {"action": "deny", "from": "10.0.0.0/8", "protocol": "tcp", "port": 22}),
    ("allow tcp port 8080", {"action": "allow", "from": None, "protocol": "tcp", "port": 8080}),
    ("deny from 2001:db8::1/32", {"action": "deny", "from": "2001:db8::/32", "protocol": "any", "port": None}),
    ("deny icmp", {"action": "deny", "from": None, "protocol": "icmp", "port": None}),
    ("deny port 53", {"action": "deny", "from": None, "protocol": "any", "port": 53}),
])
def test_policy_rule_text_round_trips(text, rule):
    assert ingress_policy.parse_rule(text) == rule
    assert ingress_policy.parse_rule(ingress_policy.rule_text(rule)) == rule
    assert ingress_policy.parse_rule(dict(rule)) == rule


@pytest.mark.parametrize("bad,message", [
    ("drop tcp", "action must be deny or allow"),
    ("deny from 10.0.0.0/33", "not a CIDR"),
    ("deny icmp port 1", "icmp has no ports"),
    ("deny tcp port 0", "not in 1-65535"),
    ("deny tcp port 80-90", "not a port"),
    ("deny tcp to 10.0.0.1", "unexpected 'to'"),
    ({"action": "deny", "dport": 1}, "unknown rule keys"),
])
def test_policy_rule_errors_name_the_problem(bad, message):
    with pytest.raises(ingress_policy.PolicyError, match=message):
        ingress_policy.parse_rule(bad)


def test_policy_sets_inherit_wider_prefixes_and_families_stay_apart():
    rules = ingress_policy.parse_rules(
        "deny from 10.0.0.0/8 udp port 53; deny from 10.1.0.0/16 tcp port 22; allow tcp port 80; "
        "deny from ::/0 icmp")
    sources, bits = ingress_policy.entries(rules)
    by_net = {str(net): (kind, set_id) for (kind, net), set_id in sources.items()}
    # v4: /8, /16 and the implicit 0.0.0.0/0 of the CIDR-less allow; v6: ::/0 only
    assert set(by_net) == {"10.0.0.0/8", "10.1.0.0/16", "0.0.0.0/0", "::/0"}
    assert by_net["::/0"][0] == abi.CidrKind.INGRESS_V6
    assert by_net["10.0.0.0/8"][0] == abi.CidrKind.INGRESS_V4

    def rules_of(net):
        set_id = by_net[net][1]
        return {(proto, port): b for (s, proto, port), b in bits.items() if s == set_id}
    assert rules_of("10.1.0.0/16") == {(17, 53): abi.MATCH_DENY, (6, 22): abi.MATCH_DENY,
                                       (6, 80): abi.MATCH_ALLOW}
    assert rules_of("10.0.0.0/8") == {(17, 53): abi.MATCH_DENY, (6, 80): abi.MATCH_ALLOW}
    assert rules_of("0.0.0.0/0") == {(6, 80): abi.MATCH_ALLOW}
    # icmp means ICMPv6 in a v6 set; the allow rule without CIDR covers v6 too
    assert rules_of("::/0") == {(58, 0): abi.MATCH_DENY, (6, 80): abi.MATCH_ALLOW}
    assert ingress_policy.allow_only(rules)


def test_policy_set_ids_are_stable_across_edits():
    before, _ = ingress_policy.entries(ingress_policy.parse_rules("deny from 10.0.0.0/8"))
    after, _ = ingress_policy.entries(ingress_policy.parse_rules(
        "deny from 10.0.0.0/8; deny from 192.168.0.0/16 tcp port 1"))
    assert set(before.items()) <= set(after.items())


def test_policy_source_keys_are_v4_mapped():
    import ipaddress
    from interceptor.datapath.maps import cidr_key
    key = cidr_key(7, abi.CidrKind.INGRESS_V4, ipaddress.ip_network("10.0.0.0/8"))
    assert bytes(key.addr) == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 0])
    assert key.prefixlen == abi.CIDR_KEY_FIXED_BITS + 96 + 8


def test_nftables_fallback_renders_the_same_verdicts():
    lines = ingress_nft.chain_rules([15000, 15001], ingress_policy.parse_rules(
        "deny from 10.0.0.0/8 tcp port 22; allow tcp port 80"), 32768)
    text = "\n".join(lines)
    assert 'th dport { 15000, 15001 } counter name "ingress_dropped_protected_port" drop' in text
    assert 'ip saddr 10.0.0.0/8 meta l4proto tcp th dport 22 counter name "ingress_dropped_denied" drop' in text
    assert text.index("ingress_dropped_denied") < text.index('counter name "ingress_passed" accept')
    assert 'tcp flags & (syn | ack) == syn counter name "ingress_dropped_not_allowed" drop' in text
    assert 'udp dport < 32768 counter name "ingress_dropped_not_allowed" drop' in text
    assert set(ingress_nft.LABELS) == {n.lower() for n, _ in abi.Reason.items() if n.startswith("INGRESS_")}


@pytest.mark.root
def test_policy_command_rejects_a_bad_rule_as_usage_error():
    result = CliRunner().invoke(main, ["policy", "add", "--pod", "a/b", "deny from nowhere"])
    assert result.exit_code == 2 and "not a CIDR" in result.output


def test_vagrantfile_validates():
    """`vagrant validate` works offline once provider-specific blocks are ignored (no
    daemon, no box needed); `make vm-bench` runs the real two-VM flow."""
    import shutil
    if not shutil.which("vagrant"):
        pytest.skip("vagrant is not installed (scripts/setup.sh installs it)")
    import tempfile
    vagrant_dir = bpf_source.BPF_DIR.parent / "vagrant"
    with tempfile.TemporaryDirectory() as scratch:
        # vagrant keeps a .vagrant directory beside the Vagrantfile unless told otherwise
        p = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=vagrant_dir,
                           capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "HOME": scratch, "VAGRANT_CHECKPOINT_DISABLE": "1",
                                "VAGRANT_DOTFILE_PATH": os.path.join(scratch, ".vagrant")})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "validated successfully" in p.stdout


@pytest.mark.parametrize("configured,expected", [
    ("/var/log/x.log", "/var/log/x.log"), ("/var/log/cni/x.log", "/var/log/cni/x.log"),
    ("x", None), ("../x", None), ("", None), ({}, None), (None, None),
    ("/etc/passwd", None), ("/var/log/../../etc/shadow", None), ("/var/log", None),
    ("/var/log//x", None), ("/var/logs/x", None), ("/var/log/x\0y", None)])
def test_cni_log_file_is_a_plain_path_under_var_log_or_the_default(monkeypatch, configured, expected):
    """A relative logFile would land in whatever directory the runtime runs plugins from;
    one elsewhere would let a network config append to any file on the node."""
    from interceptor.cni import plugin as cni
    monkeypatch.delenv("INTERCEPTOR_CNI_LOG", raising=False)
    assert cni.Log({"logFile": configured}, {}, sys.stderr).path == (expected or cni.DEFAULT_LOG)


def test_listener_lookup_skips_ipv6_where_the_node_has_none(monkeypatch):
    """With ipv6.disable=1 the kernel has no sock_diag handler for AF_INET6 (ENOENT):
    that family has no listeners, rather than failing every enroll. Other errors stand."""
    import errno
    import socket
    from interceptor.kernel import listeners

    def dump(protocol, msg_type, req):
        if req[0] == socket.AF_INET6:
            raise OSError(errno.ENOENT, "no handler")
        return iter(())
    monkeypatch.setattr(listeners.netlink, "dump", dump)
    assert listeners._listener_inodes(15006) == {}

    def failing(protocol, msg_type, req):
        raise OSError(errno.EPERM, "denied")
    monkeypatch.setattr(listeners.netlink, "dump", failing)
    with pytest.raises(OSError):
        listeners._listener_inodes(15006)


def test_the_cni_add_path_needs_only_the_standard_library():
    """The plugin runs as `python3 -S` (no site packages): everything an ADD, DEL or
    CHECK imports, down to each datapath piece, must come without BCC, scapy, pyroute2,
    click or prometheus_client."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import interceptor.cni.plugin, interceptor.cni.config, interceptor.ops.enrollment\n"
            "import interceptor.pieces, interceptor.kernel.rules, interceptor.pieces.ingress_nft\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'bcc', 'scapy', 'pyroute2', 'click', 'prometheus_client', "
            "'dataclasses', 'inspect'}))" % root)     # the last two: ~14 ms per call
    out = subprocess.run(["/usr/bin/python3", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_dirwatch_sees_writes_renames_and_its_directory_replaced(tmp_path):
    """The agent's conf-dir watch (inotify): a write and a rename into place wake it,
    and a directory removed and made again is reported stale (the agent then watches
    the new one instead of a dead inode)."""
    from interceptor.agent.dirwatch import DirWatch
    d = tmp_path / "net.d"
    d.mkdir()
    w = DirWatch(str(d))
    try:
        assert not w.wait(0)
        (d / "10-a.conflist").write_text("{}")
        assert w.wait(1) and not w.wait(0)          # drained
        (tmp_path / "new").write_text("{}")
        os.replace(tmp_path / "new", d / "10-a.conflist")
        assert w.wait(1) and not w.stale()
        (d / "10-a.conflist").unlink()
        d.rmdir()
        d.mkdir()
        assert w.wait(1) and w.stale()
    finally:
        w.close()


def test_the_cli_reads_no_node_paths_before_a_command_runs():
    """`bench` points pins and state at its own directories by setting the environment
    before the modules reading it are imported: the CLI module itself must not import
    them (when it did, the bench's plugin and loader disagreed on the run dir)."""
    out = subprocess.run([sys.executable, "-c", "import sys, interceptor.cli; "
                          "print(sorted(m for m in sys.modules if m in ('interceptor.paths', "
                          "'interceptor.state')))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- map sizes and migrations (migrate.py, map_sizes.py) -----------------------------
from interceptor.datapath import migrate
from interceptor.datapath.maps import LAYOUT, SINGLE_SLOT, SK_STORAGE  # noqa: E402
from interceptor.ops import map_sizes  # noqa: E402


def test_every_sizable_map_exists_and_only_fixed_ones_are_left_out():
    assert set(abi.MAP_CAPACITY) <= set(LAYOUT)
    assert set(LAYOUT) - set(abi.MAP_CAPACITY) == set(SK_STORAGE + SINGLE_SLOT)
    header = abi.render_header()
    for macro in abi.MAP_CAPACITY.values():
        assert f"#ifndef {macro}\n#define {macro} " in header


def test_map_sizes_parse_and_name_what_is_wrong():
    assert map_sizes.parse(["pods=8192", "redirected=262144"]) == {"pods": 8192, "redirected": 262144}
    for bad, why in (("pods", "expected MAP=ENTRIES"), ("xdp_main=2", "not a map with a settable size"),
                     ("pods=0", "whole number"), ("pods=-1", "whole number"), ("pods=1e3", "whole number"),
                     ("pods=٣", "whole number"), (f"pods={map_sizes.LARGEST + 1}", "whole number")):
        with pytest.raises(map_sizes.MapSizeError, match=why):
            map_sizes.parse([bad])


def test_flags_and_version_follow_the_sizes():
    assert bpf_source.compile_flags(7) == ["-DHOST_NETNS_COOKIE=7"]
    assert bpf_source.compile_flags(7, {"pods": 10}) == ["-DHOST_NETNS_COOKIE=7", "-DMAX_PODS=10"]
    v = bpf_source.datapath_version
    assert v() == v({}) != v({"pods": 10}) != v({"pods": 11})


@pytest.mark.root
def test_a_bad_map_size_is_a_usage_error():
    r = CliRunner().invoke(main, ["load", "--map-size", "podz=3"])
    assert r.exit_code == 2 and "not a map with a settable size" in r.output


def _layout(*fields):
    return migrate.Layout(max(o + s for _, o, s, _k in fields), [migrate.Field(*f) for f in fields])


def test_a_conversion_moves_fields_by_name_widens_ints_and_zeroes_new_ones():
    old = _layout(("a", 0, 4, "int"), ("b", 4, 2, "int"), ("addr", 6, 4, "bytes"))
    new = _layout(("addr", 0, 4, "bytes"), ("b", 4, 4, "int"), ("c", 8, 4, "int"), ("a", 12, 4, "int"))
    conv = migrate.Conversion("v", old, old.size, new, is_key=False)
    raw = (7).to_bytes(4, "little") + (300).to_bytes(2, "little") + b"\x0a\x00\x00\x01"
    out = conv(raw)
    assert out[:4] == b"\x0a\x00\x00\x01"
    assert int.from_bytes(out[4:8], "little") == 300 and out[8:12] == bytes(4)
    assert int.from_bytes(out[12:16], "little") == 7
    assert not conv.identity


def test_a_conversion_refuses_what_would_lose_or_mangle_values():
    old = _layout(("a", 0, 8, "int"), ("addr", 8, 4, "bytes"))
    for new, why in ((_layout(("a", 0, 4, "int"), ("addr", 4, 4, "bytes")), "field a changes from 8 bytes"),
                     (_layout(("a", 0, 8, "int"), ("addr", 8, 8, "bytes")), "field addr changes"),
                     (_layout(("a", 0, 8, "bytes"), ("addr", 8, 4, "bytes")), "field a changes")):
        with pytest.raises(migrate.MigrationError, match=why):
            migrate.Conversion("v", old, old.size, new, is_key=False)
    # a key that loses a field could map two entries onto one
    with pytest.raises(migrate.MigrationError, match="loses field.*addr.*collide"):
        migrate.Conversion("k", old, old.size, _layout(("a", 0, 8, "int")), is_key=True)
    assert migrate.Conversion("v", old, old.size, _layout(("a", 0, 8, "int")), is_key=False)


def test_an_unrecorded_or_mismatched_layout_is_copied_only_when_sizes_agree():
    new = _layout(("a", 0, 8, "int"))
    assert migrate.Conversion("v", None, 8, new, is_key=False).identity
    wrong_record = _layout(("a", 0, 4, "int"))          # says 4 bytes, the map has 8
    assert migrate.Conversion("v", wrong_record, 8, new, is_key=False).identity
    with pytest.raises(migrate.MigrationError, match="not recorded"):
        migrate.Conversion("v", None, 4, new, is_key=False)
    assert migrate.Layout.from_json({"size": "x"}) is None and migrate.Layout.from_json([]) is None


def test_every_map_layout_round_trips_through_the_node_state():
    for name, doc in migrate.layouts().items():
        key = migrate.Layout.from_json(json.loads(json.dumps(doc["key"])))
        assert key.size == migrate.Layout.of(LAYOUT[name][0]).size
        assert migrate.Conversion(name, key, key.size, migrate.Layout.of(LAYOUT[name][0]), is_key=True).identity


def test_the_kernel_matrix_table_shows_each_kernels_capabilities_choice_and_steps():
    """vm/matrix.py's table from two guests' reports: a kernel missing a hook shows NO
    for it, the plan each mode chose, and a failed step with its detail below."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "matrix", bpf_source.BPF_DIR.parent / "vm" / "matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    def guest(release, sock_ops, plan, failed_step=None):
        """A guest's report: doctor (sock_ops as given), `auto` selfchecks with each sidecar."""
        plan = dict(zip(("mode", "outbound", "inbound", "ingress"), plan))
        steps = [{"name": n, "ok": n != failed_step, "detail": "HTTP 502" if n == failed_step else ""}
                 for n in matrix.ENVOY_STEPS]
        ok = failed_step is None
        return matrix.KernelRun(release, "tcg", 90.0, doctor={
            "checks": [{"name": "sock_ops", "ok": sock_ops}, {"name": "sk_lookup", "ok": True}],
            "plan": plan}, selfchecks=[{"mode": "auto", "proxy": proxy, "exit": 0 if ok else 1, "seconds": 40,
                                        "result": {"ok": ok, "steps": steps, "plan": plan}}
                                       for proxy in ("haproxy", "envoy")])

    old = guest("5.10.0-32", False, ("nftables", "rules", "rules", "nftables"))
    new = guest("6.1.0-56", True, ("ebpf", "ebpf", "ebpf", "xdp"), failed_step="request")
    assert old.ok and not new.ok
    rows = {line.strip().split("  ")[0]: line.split() for line in matrix.table([old, new]).splitlines()}
    assert rows["sock_ops"][-2:] == ["NO", "yes"]
    # a plan of the BPF filter recorded without filter_hooks had both hooks
    assert rows["selfcheck --mode auto"][-8:] == ["nftables:", "rules,", "rules,", "nftables",
                                                  "ebpf:", "ebpf,", "ebpf,", "tc/xdp"]
    assert rows["selfcheck --mode auto --proxy envoy"][-8:] == rows["selfcheck --mode auto"][-8:]
    assert rows["request"][-2:] == ["ok", "FAIL"]
    assert rows["self-call"][-2:] == ["ok", "ok"]
    assert [w for w in rows["result"] if w in ("PASS", "FAIL")] == ["PASS", "FAIL"]
    text = matrix.table([old, new])
    assert "6.1.0-56 --mode auto request: HTTP 502" in text
    assert "6.1.0-56 --mode auto --proxy envoy request: HTTP 502" in text


# --- Istio's rules for the proxy's own connections over lo (rules.py) -------------------
from interceptor.kernel import rules  # noqa: E402


def test_inbound_source_constants_agree():
    import ipaddress
    assert int(ipaddress.IPv4Address(abi.INBOUND_SOURCE_V4)) == abi.INBOUND_SOURCE_V4_INT
    assert int(ipaddress.IPv6Address(abi.INBOUND_SOURCE_V6)) == abi.INBOUND_SOURCE_V6_LAST_WORD


def test_rules_follow_istio_order_for_the_proxy_over_lo():
    """From the inbound source: left alone; the proxy's uid to its pod over lo (not
    127.0.0.1 / ::1, not 15008 or its capture ports): to the inbound port; every other
    owner over lo: left alone; then the proxy's uid; then the same for its gid
    (istio-iptables' ISTIO_OUTPUT order)."""
    reasons = [r.reason for r in rules.outbound_rules(PodSettings())]
    per_owner = ["out_self_to_inbound", "out_self_to_inbound", "out_skip_loopback", "out_skip_loopback",
                 "out_skip_local_pod", "out_skip_proxy_owner"]
    assert reasons[:2 + 2 * len(per_owner)] == ["out_skip_inbound_source"] * 2 + per_owner * 2
    nft = rules.nft_script(PodSettings(), [rules.OUTBOUND])
    assert 'oifname "lo" ip saddr { 127.0.0.6/32 } counter return comment "out_skip_inbound_source"' in nft
    assert ('meta l4proto tcp oifname "lo" meta skuid { 1337 } ip daddr != 127.0.0.1/32 '
            'tcp dport != { 15001, 15006, 15008 } counter redirect to :15006 comment "out_self_to_inbound"') in nft
    assert 'oifname "lo" meta skuid != { 1337 } counter return comment "out_skip_local_pod"' in nft
    assert 'oifname "lo" meta skuid { 1337 } ip6 daddr != ::1/128' in nft
    v4 = rules.iptables_restore_input(PodSettings(), [rules.OUTBOUND], 4)
    assert ("-A INTERCEPTOR_OUTPUT -p tcp -o lo ! -d 127.0.0.1/32 -m multiport ! --dports 15001,15006,15008 "
            "-m owner --uid-owner 1337 -m comment --comment out_self_to_inbound -j REDIRECT --to-ports 15006") in v4
    assert "-A INTERCEPTOR_OUTPUT -o lo -s 127.0.0.6/32 -m comment --comment out_skip_inbound_source -j RETURN" in v4
    v6 = rules.iptables_restore_input(PodSettings(), [rules.OUTBOUND], 6)
    assert "-s ::6/128" in v6 and "! -d ::1/128" in v6 and "127.0.0" not in v6


def test_excluded_cidrs_win_over_included_ports_as_in_istio():
    """istio-iptables: excluded CIDRs, then included ports, then included CIDRs."""
    s = PodSettings(exclude_outbound_cidrs="10.96.0.0/12", include_outbound_ports="80")
    reasons = [r.reason for r in rules.outbound_rules(s)]
    assert reasons.index("out_skip_excluded_cidr") < reasons.index("out_redirected")


@pytest.mark.parametrize("mode,enrolled", [("NONE", False), ("TPROXY", True), ("REDIRECT", True)])
def test_the_interception_mode_annotation(mode, enrolled):
    config = {"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"sidecar.istio.io/interceptionMode": mode}}}
    decision = cni_config.decide(config, {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "p"})
    assert decision.enroll is enrolled, decision.reason
    if not enrolled:
        assert "sidecar.istio.io/interceptionMode" in decision.reason


def test_port_ranges_are_expanded_and_bounded():
    assert parsing.ports("15000-15003,80") == [80, 15000, 15001, 15002, 15003]
    for bad in ("20-10", "1-65535", "0-5"):
        with pytest.raises(ValueError):
            parsing.ports(bad)
    nft = rules.nft_script(PodSettings(exclude_outbound_ports="15000-15010,22"), [rules.OUTBOUND])
    assert "dport { 22, 15000-15010 }" in nft
    v4 = rules.iptables_restore_input(PodSettings(exclude_outbound_ports="15000-15010,22"), [rules.OUTBOUND], 4)
    assert "--dports 22,15000:15010" in v4


def test_istio_options_convert_to_settings():
    from interceptor.pod import istio
    raw = istio.from_config({"ProxyUID": "3,4", "ProxyGID": "1,2", "RedirectDNS": True,
                             "DNSServersV4": ["10.96.0.10"], "OwnerGroupsInclude": "202",
                             "KubeVirtInterfaces": "eth1", "InboundPortsInclude": "*"})
    s = PodSettings(**raw)
    assert s.proxy_uid == (3, 4) and s.proxy_gid == (1, 2)
    assert s.redirect_dns and [str(a) for a in s.dns_servers] == ["10.96.0.10"]
    assert s.owner_groups_include == (202,) and s.reroute_interfaces == ("eth1",)
    assert s.flags() & abi.POD_F_MORE_PROXY_IDS and s.flags() & abi.POD_F_GROUPS_INCLUDE
    assert s.steers_all_inbound and s.include_outbound_cidrs == []
    with pytest.raises(ValueError):
        istio.from_config({"InboundTunnelPort": "15009"})
    with pytest.raises(SettingError):
        PodSettings(owner_groups_include="java")      # a name resolves only in the image


# --- what to do with the node's datapath (ensure.decide), for load, upgrade and the agent
def _node(mode="auto", version="v1", sizes=None, complete=True, bypass=False, upgrading_to=None, cgroup=None):
    from interceptor.datapath.node_state import NodeState
    from interceptor.datapath.plan import Mechanism, Plan
    plan = Plan(mode="ebpf", outbound=Mechanism.EBPF, inbound=Mechanism.EBPF, bypass=bypass, sockmap=True)
    return NodeState(requested_mode=mode, plan=plan, complete=complete, datapath_version=version,
                     map_sizes=sizes or {}, upgrading_to=upgrading_to, cgroup=cgroup)


def _decide_cases():
    from interceptor.ops.ensure import Action as A, Asker, Request
    L, U, G = Asker.LOAD, Asker.UPGRADE, Asker.AGENT
    big = {"pods": 8192}
    # (what is loaded, whole, request, version of what is asked, action, words of why)
    return [
        (None, False, Request(L, mode="auto"), "v1", A.LOAD, ""),
        (None, False, Request(G, mode="auto", map_sizes={}), "v1", A.LOAD, ""),
        (None, False, Request(U), "v1", A.REFUSE, "nothing is loaded to upgrade"),
        (_node(complete=False), False, Request(L, mode="auto"), "v1", A.LOAD, ""),
        # complete but lost a pin: repaired in place, unless asked for another mode or sizes
        (_node(), False, Request(L, mode="auto"), "v1", A.REPAIR, ""),
        (_node(), False, Request(G, mode="auto", map_sizes={}), "v1", A.REPAIR, ""),
        (_node(), False, Request(L, mode="nftables"), "v1", A.LOAD, ""),
        (_node(), False, Request(G, mode="auto", map_sizes=big), "v2", A.LOAD, ""),
        # whole: load keeps it, switches the bypass, refuses other sizes, mode or cgroup
        (_node(), True, Request(L, mode="auto", bypass=False), "v1", A.KEEP, ""),
        (_node(version="v0"), True, Request(L, mode="auto", bypass=False), "v1", A.KEEP, ""),
        (_node(), True, Request(L, mode="auto", bypass=True), "v1", A.SWITCH_BYPASS, ""),
        (_node(), True, Request(L, mode="auto", map_sizes=big), "v2", A.REFUSE, "upgrade --map-size"),
        (_node(mode="nftables"), True, Request(L, mode="auto"), "v1", A.REFUSE, "this load asks for --mode auto"),
        (_node(cgroup="/sys/fs/cgroup/a"), True, Request(L, mode="auto", cgroup="/sys/fs/cgroup/b"), "v1",
         A.REFUSE, "already loaded at cgroup"),
        # whole: the agent and upgrade keep this version and upgrade another (or finish one)
        (_node(), True, Request(G, mode="auto", map_sizes={}), "v1", A.KEEP, ""),
        (_node(version="v0"), True, Request(G, mode="auto", map_sizes={}), "v1", A.UPGRADE, ""),
        (_node(version="v2", sizes=big), True, Request(G, mode="auto", map_sizes={}), "v1", A.UPGRADE, ""),
        (_node(upgrading_to="v1"), True, Request(G, mode="auto", map_sizes={}), "v1", A.UPGRADE, ""),
        (_node(mode="nftables"), True, Request(G, mode="auto", map_sizes={}), "v1",
         A.REFUSE, "loaded with --mode nftables, this agent asks for --mode auto"),
        (_node(), True, Request(U), "v1", A.KEEP, ""),
        (_node(version="v0"), True, Request(U, map_sizes=big), "v2", A.UPGRADE, ""),
    ]


@pytest.mark.parametrize("case", range(21))
def test_ensure_decides_load_repair_keep_switch_upgrade_or_refuse(case):
    from interceptor.ops.ensure import decide
    cases = _decide_cases()
    assert len(cases) == 21
    node, whole, request, version, action, why = cases[case]
    decision = decide(node, whole, request, version)
    assert decision.action == action and why in decision.why, decision


def test_an_upgrade_keeps_the_map_sizes_it_does_not_name_and_the_agent_declares_them():
    from interceptor.ops.ensure import Asker, Request
    node = _node(sizes={"pods": 8192, "redirected": 1024})
    assert Request(Asker.UPGRADE, map_sizes={"pods": 100}).sizes_for(node) == {"pods": 100, "redirected": 1024}
    assert Request(Asker.UPGRADE).sizes_for(node) == node.map_sizes
    assert Request(Asker.AGENT, map_sizes={"pods": 100}).sizes_for(node) == {"pods": 100}


def test_an_agent_refused_by_ensure_is_not_ready_says_why_and_counts_it_once(monkeypatch):
    """A node loaded with another --mode: ensure refuses (above), the agent leaves the
    datapath alone, says why it is not ready, and counts it once however often it retries."""
    from interceptor.ops import ensure
    from interceptor.agent import agent
    def refuse(request, log):
        raise ensure.Refused(ensure.decide(_node(mode="nftables"), True, request, "v1").why)
    monkeypatch.setattr(ensure, "ensure", refuse)
    a = agent.Agent.__new__(agent.Agent)      # no CNI server, no threads: the decision only
    a.config, a.log, a.counters, a.datapath_problem = agent.AgentConfig(mode="auto"), lambda m: None, \
        agent.AgentCounters(), "not started"
    for _ in range(2):
        a.ensure_datapath()
    assert "loaded with --mode nftables, this agent asks for --mode auto" in a.datapath_problem
    assert "restart the agent" in a.datapath_problem
    assert a.counters.datapath["refused"] == 1


def test_an_agent_whose_package_lacks_the_plugins_front_is_not_ready_saying_so(tmp_path, monkeypatch):
    """Installed from source without a C compiler there is no static front to install:
    the agent stays up, not ready, and says what to do, instead of a traceback."""
    from interceptor.agent import agent
    from interceptor.cni import install as cni_install
    monkeypatch.setattr(cni_install, "FRONT", str(tmp_path / "no-front"))
    cni_install.fingerprint_of_this.cache_clear()
    a = agent.Agent.__new__(agent.Agent)
    a.config, a.log, a.plugin_problem = agent.AgentConfig(cni_bin_dir=str(tmp_path / "bin")), lambda m: None, None
    a.datapath_problem, a.chain, a._lock = None, None, __import__("threading").Lock()
    try:
        a.install_plugin()
    finally:
        cni_install.fingerprint_of_this.cache_clear()
    assert "python3 -m interceptor.cni.front" in a.plugin_problem
    ready, reasons = a.readiness()
    assert not ready and any("the CNI plugin is not installed" in r for r in reasons)
    assert not (tmp_path / "bin" / "interceptor-cni").exists()
