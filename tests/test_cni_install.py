"""`interceptor cni install|uninstall` on a conf dir: pure file work, no kernel."""
import json
import os
import subprocess
import sys

import pytest

from interceptor.cni import install as cni_install

pytestmark = pytest.mark.root     # the CLI refuses to run as another user

BRIDGE = {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "interceptor.cli", "cni", *args],
                          capture_output=True, text=True)


def snapshot(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def test_install_chains_into_the_first_conflist_and_uninstall_restores_it(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    (conf / "10-net.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "net", "plugins": [BRIDGE]}, indent=1))
    (conf / "20-other.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "other", "plugins": [BRIDGE]}))
    before = snapshot(conf)

    r = cli("install", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert r.returncode == 0, r.stderr
    doc = json.loads((conf / "10-net.conflist").read_text())
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "interceptor-cni"]
    assert doc["plugins"][1]["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    assert (conf / "20-other.conflist").read_bytes() == before["20-other.conflist"]
    assert os.access(bins / "interceptor-cni", os.X_OK)
    assert (conf / ("10-net.conflist" + cni_install.BACKUP_SUFFIX)).exists()

    after_first = snapshot(conf)
    r = cli("install", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert r.returncode == 0 and "already installed" in r.stdout
    assert snapshot(conf) == after_first

    r = cli("uninstall", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert r.returncode == 0, r.stderr
    assert snapshot(conf) == before          # byte for byte: nothing else changed it meanwhile
    assert not (bins / "interceptor-cni").exists()
    # changed by someone else meanwhile: our entry goes, their change stays
    cli("install", "--bin-dir", str(bins), "--conf-dir", str(conf))
    doc = json.loads((conf / "10-net.conflist").read_text())
    doc["plugins"][0]["mtu"] = 1400
    (conf / "10-net.conflist").write_text(json.dumps(doc))
    cli("uninstall", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert json.loads((conf / "10-net.conflist").read_text())["plugins"] == [dict(BRIDGE, mtu=1400)]
    assert set(snapshot(conf)) == set(before)


def test_single_plugin_conf_is_converted_and_restored_byte_for_byte(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    original = json.dumps(dict(BRIDGE, cniVersion="0.4.0", name="net"), indent=3)
    (conf / "10-net.conf").write_text(original)
    assert cli("install", "--bin-dir", str(bins), "--conf-dir", str(conf)).returncode == 0
    assert not (conf / "10-net.conf").exists()
    doc = json.loads((conf / "10-net.conflist").read_text())
    assert doc["cniVersion"] == "0.4.0" and doc["name"] == "net"
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "interceptor-cni"]
    assert cli("uninstall", "--bin-dir", str(bins), "--conf-dir", str(conf)).returncode == 0
    assert sorted(os.listdir(conf)) == ["10-net.conf"]
    assert (conf / "10-net.conf").read_text() == original


@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_refuses_a_conf_dir_without_network_config(tmp_path, command):
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "README").write_text("not a config")
    r = cli(command, "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(conf))
    assert r.returncode == 1
    assert "no network configuration" in r.stderr
    assert sorted(os.listdir(conf)) == ["README"]
    assert not (tmp_path / "bin" / "interceptor-cni").exists()


def test_the_runner_is_chosen_at_install_time(tmp_path):
    """python (the CLI's default, a node set up by hand): the plugin runs itself under the
    Python that installed it; agent (what the node agent installs): the static front
    alone. Switching runners replaces the file; the same runner again changes nothing."""
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    (conf / "10-net.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "net", "plugins": [BRIDGE]}))
    plugin = bins / "interceptor-cni"
    assert cli("install", "--bin-dir", str(bins), "--conf-dir", str(conf)).returncode == 0
    assert plugin.read_bytes().startswith(f"#!{sys.executable} -S\n".encode())
    r = cli("install", "--runner", "agent", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert r.returncode == 0 and "runner: agent" in r.stdout, r.stdout + r.stderr
    with open(cni_install.FRONT, "rb") as f:
        assert plugin.read_bytes() == f.read()
    r = cli("install", "--runner", "agent", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert r.returncode == 0 and "already installed" in r.stdout
    r = cli("install", "--runner", "elsewhere", "--bin-dir", str(bins), "--conf-dir", str(conf))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert cli("uninstall", "--bin-dir", str(bins), "--conf-dir", str(conf)).returncode == 0
    assert not plugin.exists()
