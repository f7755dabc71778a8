"""The deployment files, checked offline: the manifests against the Kubernetes API
schemas (kubernetes-validate, strict), and against the agent they run."""
import glob
import json
import os
import subprocess
import sys

import yaml

from interceptor.cni import config as cni_config
from interceptor.cli import agent as agent_command, uninstall as uninstall_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml")))


def manifest(name):
    with open(os.path.join(ROOT, "deploy", "kubernetes", name)) as f:
        return yaml.safe_load(f)


def test_manifests_are_valid_kubernetes_objects():
    assert len(MANIFESTS) == 3
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"),
                        "--strict", "--quiet", *MANIFESTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _flags(command):
    return {opt for p in command.params for opt in p.opts}


def test_the_daemonset_runs_the_agent_as_it_is():
    spec = manifest("daemonset.yaml")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    command, *args = container["args"]
    assert command == "agent"
    assert {a.split("=")[0] for a in args} <= _flags(agent_command)
    listen = next(a for a in args if a.startswith("--listen="))
    port = int(listen.rsplit(":", 1)[1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert spec["hostNetwork"] and spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    # the paths the agent is told about are mounted
    for a in args:
        if a.startswith(("--cni-bin-dir=", "--cni-conf-dir=", "--plugin-config=", "--cri-socket=")):
            path = a.split("=", 1)[1]
            assert any(path == m or path.startswith(m + "/") for m in mounts), path


def test_the_configmap_entry_is_a_valid_plugin_config():
    entry = json.loads(manifest("configmap.yaml")["data"]["plugin-entry.json"])
    enrolled = cni_config.decide(entry, {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web"})
    skipped = cni_config.decide(entry, {"K8S_POD_NAMESPACE": "kube-system", "K8S_POD_NAME": "dns"})
    assert enrolled.enroll and not skipped.enroll


def test_the_uninstall_job_runs_uninstall():
    container = manifest("uninstall-job.yaml")["spec"]["template"]["spec"]["containers"][0]
    command, *args = container["args"]
    assert command == "uninstall" and {a.split("=")[0] for a in args} <= _flags(uninstall_command)
