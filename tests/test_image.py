"""The agent's container image (deploy/Containerfile, built by deploy/build-image.sh):
the package as installed in it compiles and loads the datapath on the host's kernel with
only the capabilities and mounts the DaemonSet gives it, and what it loads is the same
datapath the host's CLI and plugin work with."""
import os
import subprocess
import uuid

import pytest
import yaml

from conftest import client, enroll, sidecar_entries, start_server, start_sidecar
from interceptor import paths
from interceptor.datapath import node_state
from interceptor.datapath.bpf_source import datapath_version
from interceptor.ops import loader, status

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def daemonset_container():
    with open(os.path.join(ROOT, "deploy", "kubernetes", "agent", "daemonset.yaml")) as f:
        spec = yaml.safe_load(f)["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


@pytest.fixture(scope="module")
def image():
    env = dict(os.environ, CONTAINERS_CONF=os.path.join(ROOT, "deploy", "podman-engine.conf"))
    tag = f"localhost/interceptor:test-{uuid.uuid4().hex[:6]}"
    forwarding = open("/proc/sys/net/ipv4/ip_forward").read()
    dangling = ["podman", "images", "-q", "--filter", "dangling=true"]
    untagged = subprocess.run(dangling, env=env, capture_output=True, text=True).stdout
    r = subprocess.run([os.path.join(ROOT, "deploy", "build-image.sh"), tag], env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert open("/proc/sys/net/ipv4/ip_forward").read() == forwarding, "the build turned on forwarding"
    assert subprocess.run(dangling, env=env, capture_output=True, text=True).stdout == untagged, \
        "the build left an untagged image behind"
    try:
        yield tag, env
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], env=env, capture_output=True)


def run_in_image(image, *args):
    """The image's `interceptor` as the DaemonSet runs it: host network and PID
    namespace, its capabilities and no others, and its mounts exactly (each hostPath
    this machine has, at its mountPath; the ConfigMap's entry as a file), nothing else:
    no kernel headers from this machine. The run dir and pin root are the tests' own (a
    real load on this machine is not touched)."""
    tag, env = image
    spec, container = daemonset_container()
    assert spec["hostNetwork"] and spec["hostPID"]
    caps = container["securityContext"]["capabilities"]
    argv = ["podman", "run", "--rm", "--net=host", "--pid=host", "--security-opt", "seccomp=unconfined",
            "--cap-drop=all", *(f"--cap-add=CAP_{c}" for c in caps["add"])]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for volume in spec["volumes"]:
        m = mounts[volume["name"]]
        if "hostPath" in volume:
            if volume["name"] == "run" or not os.path.exists(volume["hostPath"]["path"]):
                continue        # the tests' run dir below; a containerd socket this machine lacks
            source = volume["hostPath"]["path"]
        else:
            source = plugin_config_dir()
        argv += ["-v", f"{source}:{m['mountPath']}{':ro' if m.get('readOnly') else ''}"]
    os.makedirs(paths.RUN_DIR, exist_ok=True)
    argv += ["-v", f"{paths.RUN_DIR}:{paths.RUN_DIR}",
             "-e", f"INTERCEPTOR_PIN_ROOT={paths.PIN_ROOT}", "-e", f"INTERCEPTOR_RUN_DIR={paths.RUN_DIR}"]
    return subprocess.run(argv + [tag, *args], env=env, capture_output=True, text=True, timeout=300)


def plugin_config_dir():
    """The ConfigMap's files in a directory, as Kubernetes mounts a configMap volume."""
    import tempfile
    with open(os.path.join(ROOT, "deploy", "kubernetes", "agent", "configmap.yaml")) as f:
        data = yaml.safe_load(f)["data"]
    d = tempfile.mkdtemp(prefix="interceptor-configmap-")
    for name, text in data.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


def test_the_image_loads_the_datapath_the_host_works_with_and_unloads_it(image, lab):
    loader.unload()
    try:
        r = run_in_image(image, "doctor")
        assert r.returncode == 0, r.stdout + r.stderr
        # BCC compiles against the headers the image brings (deploy/Containerfile)
        assert "headers /usr/share/interceptor/kernel-headers" in r.stdout, r.stdout
        r = run_in_image(image, "load")
        assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stdout + r.stderr
        # the image's build of the datapath is this checkout's: the plugin and CLI use it
        assert node_state.is_loaded() and node_state.current().datapath_version == datapath_version()
        assert not status.collect()["errors"]
        a, b = lab.add_pod("a"), lab.add_pod("b")
        start_server(b)
        log = start_sidecar(lab, a)
        enroll(a)
        assert client(a, b.ipv4)["reply"]["bytes"] == 5
        assert [e["orig_dst"] for e in sidecar_entries(log)] == [f"{b.ipv4}:8080"]
        r = run_in_image(image, "status")
        assert r.returncode == 0 and "1/1 healthy" in r.stdout, r.stdout + r.stderr
        r = run_in_image(image, "unload")
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(paths.PIN_ROOT) and not os.path.exists(paths.NODE_STATE)
        assert client(a, b.ipv4)["reply"]["bytes"] == 5 and len(sidecar_entries(log)) == 1
    finally:
        loader.unload()
