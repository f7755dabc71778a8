"""Who can change what: as `nobody`, every command that changes the node fails with a
clear message and changes nothing, and neither the pins nor the state can be written
directly. State files are written atomically and never through a symlink someone
placed; one found where a record goes is named by status and removed by unenroll."""
import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import enroll, loaded, node_fingerprint
from interceptor import paths, store
from interceptor.kernel import libbpf, netns
from interceptor.ops import status

pytestmark = pytest.mark.kernel


def as_nobody(*argv):
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                           *argv], capture_output=True, text=True, timeout=60, cwd="/")


def cli_as_nobody(*args):
    return as_nobody(sys.executable, "-m", "interceptor.cli", *args)


def fingerprint():
    return node_fingerprint()


def test_nobody_cannot_change_the_node(lab):
    with loaded():
        pod = lab.add_pod("a")
        enroll(pod)
        cookie = netns.cookie_of(pod.netns_path)
        before = fingerprint()
        for args in (["load"], ["unload"], ["upgrade"], ["enroll", "--netns", pod.netns_path],
                     ["unenroll", "--cookie", str(cookie)],
                     ["policy", "set", "--cookie", str(cookie), "deny tcp port 22"], ["status"]):
            r = cli_as_nobody(*args)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr and "root" in r.stderr, (args, r.stderr)
        assert fingerprint() == before
        # and not around the CLI: the pins and the state refuse a non-root writer
        probe = ("import os, sys\n"
                 "from interceptor.kernel import libbpf\n"
                 "for pin in sys.argv[1:3]:\n"
                 "    try:\n        libbpf.obj_get(pin); print('opened', pin)\n"
                 "    except OSError as e:\n        print('refused', e.errno)\n"
                 "for path in sys.argv[3:]:\n"
                 "    try:\n        open(path, 'a'); print('opened', path)\n"
                 "    except OSError as e:\n        print('refused', e.errno)\n")
        r = as_nobody(sys.executable, "-c", probe, paths.map_pin("pods"), paths.prog_pin("connect4"),
                      paths.NODE_STATE, paths.pod_state_file(cookie), os.path.join(paths.RUN_DIR, "new"))
        assert r.stdout.split("\n")[:5] == ["refused 13"] * 5, r.stdout + r.stderr
        for path in (paths.NODE_STATE, paths.pod_state_file(cookie)):
            mode = os.lstat(path).st_mode
            assert stat.S_IMODE(mode) & 0o022 == 0 and os.lstat(path).st_uid == 0
        assert stat.S_IMODE(os.stat(paths.map_pin("pods")).st_mode) == 0o600
        assert fingerprint() == before


def test_a_symlink_where_state_goes_is_neither_followed_nor_trusted(lab, tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    with loaded():
        pod = lab.add_pod("a")
        enroll(pod)
        cookie = netns.cookie_of(pod.netns_path)
        record = paths.pod_state_file(cookie)
        os.unlink(record)
        os.symlink(target, record)
        report = status.collect()
        pods = {p["cookie"]: p for p in report["pods"]}
        assert any(str(cookie) in e and "unreadable" in e for e in report["errors"]) or \
            "unreadable" in json.dumps(pods.get(cookie)), report
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "unenroll", "--cookie", str(cookie)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert not os.path.lexists(record)
        # a writer replaces a symlink at its path; the file it pointed at is untouched
        os.symlink(target, record)
        store.write_json(record, {"x": 1})
        assert not os.path.islink(record) and target.read_text() == "keep me"
        os.unlink(record)
    with pytest.raises(OSError):
        libbpf.obj_get(paths.map_pin("pods"))      # unloaded: nothing left behind
    assert target.read_text() == "keep me"
