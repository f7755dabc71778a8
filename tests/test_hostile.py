"""Hostile input at the entry points besides the CNI plugin (tests/test_cni_spec.py has
the CNI corpus): CLI flags and arguments, policy rule strings, and the state files on
disk. Each input gets a clear error (click's usage error, exit 2; or `error: ...`, exit
1), never a traceback, and changes nothing; a damaged state file is named by status and
there is a way out."""
import json
import os
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import enroll, loaded, node_fingerprint, publish_figures
from interceptor import paths, store
from interceptor.kernel import netns
from interceptor.pod import ingress_policy, podrecord
from interceptor.ops import status
from interceptor.cli import main

pytestmark = pytest.mark.kernel

GARBAGE = ["", " ", "-1", "0", "65536", "4294967296", "1e9", "0x10", "٣", "NaN", "true", "null",
           "a" * 5000, "\udcff\udcfe", "nul\0byte", "../../etc/passwd", "/proc/self/ns/net", "/dev/null",
           "/", "-", "--", "x/y/z", "/nonexistent/netns", "{}", "[1,2]", "10.0.0.0/99", "::/129",
           "deny from 1.2.3.4/40", "allow tcp port 70000", "\n", "\t", "ü" * 300, "%s%s%n"]


def fingerprint():
    return node_fingerprint("/etc/cni/net.d", "/opt/cni/bin")


def cli_inputs(pod, cookie):
    """Invocations, each with one value that cannot be valid (a value that might be is
    made invalid: a suffix on a number, a slash in a file name: a valid one would change
    the node, and `cni install` to any directory is valid, so it is not here)."""
    netns_path = pod.netns_path
    cases = []
    for g in GARBAGE:
        cases += [
            ["enroll", "--netns", g.replace("\0", "")],      # argv cannot carry a NUL byte
            ["enroll", "--netns", netns_path, "--outbound-port", g + "x"],
            ["enroll", "--netns", netns_path, "--proxy-uid", g + "x"],
            ["enroll", "--netns", netns_path, "--include-outbound-cidrs", g + "/x"],
            ["enroll", "--netns", netns_path, "--exclude-inbound-ports", g + ",x"],
            ["enroll", "--netns", netns_path, "--no-proxy", g + "x"],
            ["enroll", "--netns", netns_path, "--ingress-filter", g + "x"],
            ["enroll", "--netns", netns_path, "--ingress-policy", g + " nonsense"],
            ["enroll", "--netns", netns_path, "--pod", g.replace("/", "") or "x"],
            ["unenroll", "--pod", g.replace("/", "") or "x"],
            ["unenroll", "--cookie", g + "x"],
            ["policy", "add", "--cookie", str(cookie), g + " nonsense"],
            ["policy", "remove", "--cookie", str(cookie), "deny tcp port 1"],      # not there
            ["policy", "set", "--cookie", g + "x", "deny tcp port 1"],
            ["policy", "set", "--pod", (g.replace("/", "") or "x"), "deny tcp port 1"],
            ["policy", "list", "--cookie", g + "x"],
            ["status", "--pod", g.replace("/", "") or "x"],
            ["status", "-o", g + "x"],
            ["load", "--mode", g + "x"],
            ["load", "--map-size", g + "x"],
            ["load", "--map-size", f"pods={g}x"],
            ["load", "--cgroup", "/nonexistent/" + g.replace("\0", "")],
            ["upgrade", "--map-size", f"{g}x=1"],
            ["agent", "--listen", g + "x"],
            ["agent", "--cni-conf-name", g + "/x"],
            ["bench", "--peer", g + ":x"],
            [g + "x"],
        ]
    return cases


def test_hostile_cli_input_gets_a_clear_error_and_changes_nothing(lab):
    runner = CliRunner()
    with loaded():
        pod = lab.add_pod("a")
        enroll(pod, ingress_policy=["deny tcp port 7"])
        cookie = netns.cookie_of(pod.netns_path)
        before = fingerprint()
        cases = cli_inputs(pod, cookie)
        bad = []
        codes = {}
        for args in cases:
            result = runner.invoke(main, args)
            codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
            unexpected = result.exception is not None and not isinstance(result.exception, SystemExit)
            if unexpected or result.exit_code not in (1, 2) or "Traceback" in result.output:
                bad.append((args[:4], result.exit_code, repr(result.exception)[:200], result.output[-300:]))
        assert not bad, bad[:5]
        assert fingerprint() == before
    print(f"{len(cases)} CLI invocations: exit codes {sorted(codes.items())}")
    publish_figures({"scenario": "hostile CLI flags and arguments", "tried": {"invocations": len(cases)},
                     "failures": len(bad), "leftovers": {}})


def rule_corpus(rng, n):
    tokens = ["deny", "allow", "from", "tcp", "udp", "sctp", "icmp", "any", "port", "10.0.0.0/8",
              "::/0", "fd00::/8", "1.2.3.4", "22", "0", "65535", "65536", "-1", "x", "/33", "from from",
              "port port", "*", ";", ",", "\0", "٣", "DENY", "Allow", "10.0.0.0/8/8", "1.2.3.4/32"]
    cidrs = ["10.0.0.0/8", "::/0", "fd00::/8", "1.2.3.4", "1.2.3.4/32", "0.0.0.0/0", "10.0.0.1/8",
             "300.1.1.1/8", "10.0.0.0/33", "x"]
    out = []
    for _ in range(n):
        if rng.random() < 0.5:      # the grammar's shape, parts drawn from good and bad values
            words = [rng.choice(["deny", "allow", "DENY", "permit"])]
            if rng.random() < 0.6:
                words += ["from", rng.choice(cidrs)]
            if rng.random() < 0.7:
                words.append(rng.choice(["tcp", "udp", "sctp", "icmp", "any", "gre"]))
            if rng.random() < 0.6:
                words += ["port", rng.choice(["22", "0", "65535", "65536", "-1", "x", "8080"])]
        else:
            words = [rng.choice(tokens) for _ in range(rng.randint(0, 8))]
        text = " ".join(words)
        if rng.random() < 0.3 and text:       # a character changed, dropped or doubled
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(["", text[i] * 2, chr(rng.randrange(1, 0x3000))]) + text[i + 1:]
        out.append(text)
    return out + [123, None, [], {}, b"deny", 1.5]


def test_policy_rule_strings_parse_or_are_refused_with_a_reason():
    rng = random.Random(7)
    corpus = rule_corpus(rng, 3000)
    valid = refused = 0
    for text in corpus:
        try:
            rule = ingress_policy.parse_rule(text)
        except ingress_policy.PolicyError as exc:
            assert str(exc) and "\n" not in str(exc)
            refused += 1
            continue
        valid += 1
        assert ingress_policy.parse_rule(ingress_policy.rule_text(rule)) == rule     # round-trips
    print(f"{len(corpus)} rule strings: {valid} valid, {refused} refused")
    assert valid > 100 and refused > 1000
    publish_figures({"scenario": "hostile policy rule strings", "tried": {"rule strings": len(corpus),
                     "valid (round-trip checked)": valid, "refused with a reason": refused},
                     "failures": 0, "leftovers": {}})


HOSTILE_VALUES = [None, True, 0, -1, 2**70, 1.5, "", "x", [], [None], {}, {"a": {}}, "\udcff"]


def corrupted_variants(good):
    """The file's text truncated at many points, each field replaced by each hostile
    type, and some raw garbage."""
    text = json.dumps(good, indent=2)
    out = [text[:i] for i in range(0, len(text), max(1, len(text) // 60))]
    for key in good:
        for value in HOSTILE_VALUES:
            out.append(json.dumps(dict(good, **{key: value})))
    out += ["[]", "null", "42", '"x"', "\0" * 50, "\xff\xfe garbage", "{" * 5000]
    return out


def write_raw(path, text):
    with open(path, "w", errors="surrogateescape") as f:
        f.write(text)


def status_survives(want):
    """status names a problem (exit 1), without a traceback."""
    report = status.collect()
    assert report["errors"], "a damaged state file must not look healthy"
    assert any(want in e for e in report["errors"]), report["errors"]
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "status"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_damaged_state_files_are_named_and_there_is_a_way_out(lab):
    tried = 0
    with loaded():
        pod = lab.add_pod("a")
        enroll(pod)
        cookie = netns.cookie_of(pod.netns_path)
        record_path = paths.pod_state_file(cookie)
        good_record = store.read_json(record_path)
        for text in corrupted_variants(good_record):
            write_raw(record_path, text)
            tried += 1
            report = status.collect()          # never raises
            pods = [p for p in report["pods"] if p["cookie"] == cookie]
            assert pods, text[:200]                # the pod is still shown, not forgotten
            if podrecord.read(cookie).damaged:     # not a record (one of other values still is)
                assert any(str(cookie) in e for e in report["errors"]), (text[:200], report["errors"])
        # a directory or a symlink where the record goes
        os.unlink(record_path)
        os.mkdir(record_path)
        status_survives(str(cookie))
        os.rmdir(record_path)
        write_raw(record_path, "{")
        # the way out: unenroll removes what a damaged record's pod had
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "unenroll", "--cookie", str(cookie)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and podrecord.read(cookie) is None, r.stderr
        enroll(pod)

        good_node = store.read_json(paths.NODE_STATE)
        for text in corrupted_variants(good_node):
            write_raw(paths.NODE_STATE, text)
            tried += 1
            status.collect()                   # never raises
            r = subprocess.run([sys.executable, "-m", "interceptor.cli", "status", "-o", "json"],
                               capture_output=True, text=True)
            assert "Traceback" not in r.stderr, (text[:200], r.stderr[-1500:])
        write_raw(paths.NODE_STATE, "{")
        status_survives("node state")
        # the way out: unload removes everything, whatever the node state says; load again works
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "unload"], capture_output=True, text=True)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert not os.path.exists(paths.PIN_ROOT) and podrecord.all_records() == {}
    print(f"{tried} damaged state files")
    publish_figures({"scenario": "damaged state files (pod record, node state: truncated, wrong types, "
                                 "garbage, a directory or symlink in place)", "tried": {"files": tried},
                     "failures": 0, "leftovers": {}})
