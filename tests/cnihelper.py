"""Driving interceptor-cni as a runtime does: the plugin installed as on a node, its
environment, the network configuration on stdin, one JSON document on stdout."""
import json
import os
import subprocess
import uuid

from interceptor import paths
from interceptor.cni import install as cni_install


def installed_plugin(tmp_path_factory):
    """The plugin exactly as `interceptor cni install` puts it on a node."""
    bin_dir = tmp_path_factory.mktemp("cni-bin")
    conf_dir = tmp_path_factory.mktemp("cni-conf")
    (conf_dir / "10-test.conflist").write_text('{"cniVersion":"1.0.0","name":"t","plugins":[]}')
    cni_install.install(str(bin_dir), str(conf_dir))
    return str(bin_dir / "interceptor-cni")


def run(plugin, log, command, config=None, stdin=None, **env):
    e = {"CNI_COMMAND": command, "PATH": os.environ["PATH"], "INTERCEPTOR_CNI_LOG": log,
         "INTERCEPTOR_PIN_ROOT": paths.PIN_ROOT, "INTERCEPTOR_RUN_DIR": paths.RUN_DIR}
    e.update({k: v for k, v in env.items() if v is not None})
    if stdin is None:
        stdin = json.dumps(config) if config is not None else ""
    p = subprocess.run([plugin], input=stdin, env=e, capture_output=True, text=True, timeout=30)
    doc = json.loads(p.stdout) if p.stdout.strip() else None   # exactly one JSON document
    return p.returncode, doc


def prev_result(version, ip="10.66.0.5"):
    ips = [{"address": f"{ip}/24", "gateway": "10.66.0.1", "interface": 0}]
    if version in ("0.3.0", "0.3.1"):
        ips[0]["version"] = "4"
    return {"cniVersion": version, "interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": ips}


def config(version="1.0.0", prev=True, ip="10.66.0.5", **extra):
    c = {"cniVersion": version, "name": "test", "type": "interceptor-cni"}
    if prev:
        c["prevResult"] = prev_result(version, ip)
    c.update(extra)
    return c


def container_env(ns, cid=None, ifname="eth0", args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"):
    return {"CNI_CONTAINERID": cid or uuid.uuid4().hex, "CNI_NETNS": ns, "CNI_IFNAME": ifname,
            "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args}


