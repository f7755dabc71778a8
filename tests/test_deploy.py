"""The deployment files, checked offline: the manifests against the Kubernetes API
schemas (kubernetes-validate, strict), and against the agent they run."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from interceptor.cni import config as cni_config
from interceptor.cli import agent as agent_command, uninstall as uninstall_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBE = os.path.join(ROOT, "deploy", "kubernetes")
MANIFESTS = sorted(p for p in glob.glob(os.path.join(KUBE, "**", "*.yaml"), recursive=True)
                   if os.path.basename(p) != "kustomization.yaml")
# what `kubectl apply -k` takes: the agent, the uninstall Job, and both on GKE's layout
KUSTOMIZATIONS = ("agent", "uninstall", "gke", "gke-uninstall")


def manifest(name):
    with open(os.path.join(KUBE, name)) as f:
        return yaml.safe_load(f)


def validate(paths):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"),
                           "--strict", "--quiet", *paths], capture_output=True, text=True)


def test_manifests_are_valid_kubernetes_objects():
    assert len(MANIFESTS) == 3
    r = validate(MANIFESTS)
    assert r.returncode == 0, r.stdout + r.stderr


def rendered(name, tmp_path):
    """The objects `kubectl apply -k deploy/kubernetes/NAME` applies."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (its kustomize) is not installed here")
    r = subprocess.run(["kubectl", "kustomize", os.path.join(KUBE, name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / f"{name}.yaml"
    out.write_text(r.stdout)
    assert validate([str(out)]).returncode == 0
    return {doc["kind"]: doc for doc in yaml.safe_load_all(r.stdout)}


def host_paths(obj):
    return {v["name"]: v["hostPath"]["path"] for v in obj["spec"]["template"]["spec"]["volumes"] if "hostPath" in v}


def test_the_node_layout_is_a_setting_with_a_kubeadm_nodes_defaults(tmp_path):
    """The node's CNI bin and conf dirs and netns dir are volumes' hostPaths: a kubeadm
    node's by default, GKE's through layouts/gke, in the agent and the uninstall Job
    alike; inside the container the paths (and so the agent's flags) stay."""
    default = rendered("agent", tmp_path)["DaemonSet"]
    assert {k: v for k, v in host_paths(default).items() if k in ("cni-bin", "cni-conf", "netns")} == \
        {"cni-bin": "/opt/cni/bin", "cni-conf": "/etc/cni/net.d", "netns": "/run/netns"}
    for name, kind in (("gke", "DaemonSet"), ("gke-uninstall", "Job")):
        obj = rendered(name, tmp_path)[kind]
        assert host_paths(obj)["cni-bin"] == "/home/kubernetes/bin", name
        assert host_paths(obj)["cni-conf"] == "/etc/cni/net.d", name
        assert obj["spec"]["template"]["spec"]["containers"][0]["args"] == \
            (default if kind == "DaemonSet" else rendered("uninstall", tmp_path)["Job"])[
                "spec"]["template"]["spec"]["containers"][0]["args"]
    assert "ConfigMap" in rendered("gke", tmp_path)


def test_the_daemonset_mounts_no_kernel_headers_and_justifies_every_mount():
    """The image brings the headers BCC compiles against: nothing from the node's
    /lib/modules or /usr/src; every volume says in a comment why it is there."""
    spec = manifest("agent/daemonset.yaml")["spec"]["template"]["spec"]
    paths = [v.get("hostPath", {}).get("path", "") for v in spec["volumes"]]
    assert not any(p.startswith(("/lib/modules", "/usr/src")) for p in paths), paths
    text = open(os.path.join(KUBE, "agent", "daemonset.yaml")).read()
    volumes = text[text.index("      volumes:"):].splitlines()[1:]
    for i, line in enumerate(volumes):
        if line.strip().startswith("- {name:"):
            above = volumes[i - 1].strip()
            assert above.startswith("#") or volumes[i - 2].strip().startswith("#"), line


def _flags(command):
    return {opt for p in command.params for opt in p.opts}


def test_the_daemonset_runs_the_agent_as_it_is():
    spec = manifest("agent/daemonset.yaml")["spec"]["template"]["spec"]
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
    entry = json.loads(manifest("agent/configmap.yaml")["data"]["plugin-entry.json"])
    enrolled = cni_config.decide(entry, {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web"})
    skipped = cni_config.decide(entry, {"K8S_POD_NAMESPACE": "kube-system", "K8S_POD_NAME": "dns"})
    assert enrolled.enroll and not skipped.enroll


def test_the_uninstall_job_runs_uninstall():
    container = manifest("uninstall/uninstall-job.yaml")["spec"]["template"]["spec"]["containers"][0]
    command, *args = container["args"]
    assert command == "uninstall" and {a.split("=")[0] for a in args} <= _flags(uninstall_command)
