"""containerd's CRI, driven as the kubelet drives it, for the agent's tests.

containerd runs by PID with a private config, root, state and socket under a scratch
directory (never the node's), and is stopped by PID. No registry: the sandbox image is a
static pause binary packed here as an OCI image and imported. The CNI chain is bridge +
host-local (Debian's plugins) + interceptor-cni, the last put there and chained by the
agent. See ../shared/notes/platform.md for why restrict_oom_score_adj is set.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
static void bye(int s) { (void)s; _exit(0); }
int main(void) { signal(SIGTERM, bye); signal(SIGINT, bye); for (;;) pause(); }
"""
PAUSE_IMAGE = "localhost/interceptor-test-pause:1"
SYSTEM_PLUGINS = "/usr/lib/cni"

CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.grpc.v1.introspection"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"""


def _blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_pause_image(workdir):
    """An OCI image layout tar with one layer: /pause."""
    src = os.path.join(workdir, "pause.c")
    binary = os.path.join(workdir, "pause")
    with open(src, "w") as f:
        f.write(PAUSE_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", binary, src], check=True, capture_output=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        t.add(binary, arcname="pause")
    layer_tar = raw.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)
    layout = os.path.join(workdir, "oci")
    layer_desc = dict(_blob(layout, layer), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": ["/pause"]},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]}}
    config_desc = dict(_blob(layout, json.dumps(config).encode()),
                       mediaType="application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = dict(_blob(layout, json.dumps(manifest).encode()),
                         mediaType="application/vnd.oci.image.manifest.v1+json",
                         platform={"architecture": "amd64", "os": "linux"},
                         annotations={"io.containerd.image.name": PAUSE_IMAGE,
                                      "org.opencontainers.image.ref.name": "1"})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [manifest_desc]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    out = os.path.join(workdir, "pause.tar")
    with tarfile.open(out, "w") as t:
        for name in ("oci-layout", "index.json", "blobs"):
            t.add(os.path.join(layout, name), arcname=name)
    return out


def bridge_conflist(subnet, bridge, data_dir):
    return {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data_dir}}]}


# interceptor-cni as containerd runs it when the plugin's own directory is elsewhere: the
# plugin installed there (by the agent), run in a mount namespace where no Python exists
# (an empty /usr/bin and empty Python library directories), as on a node image without
# Python. Each call notes on the evidence file whether Python was visible to it.
NO_PYTHON_WRAPPER = r"""#!/bin/sh
exec unshare --mount --propagation private /bin/sh -c '
for d in /usr/lib/python3* /usr/local/lib/python3*; do
  [ -d "$d" ] && mount -t tmpfs -o ro,size=4k none "$d"
done
mount -t tmpfs -o ro,size=4k none /usr/bin
if [ -e /usr/bin/python3 ] || [ -e /usr/lib/python3/dist-packages ]; then seen=present; else seen=absent; fi
echo "$CNI_COMMAND python-$seen" >> "$1"
exec "$2"' sh {evidence} {plugin}
"""


class Containerd:
    """containerd with the CRI plugin, private to one test module. plugin_dir: where the
    agent installs interceptor-cni; containerd then runs it from there with no Python
    visible (NO_PYTHON_WRAPPER), and plugin_calls() says what it saw."""

    def __init__(self, workdir, subnet="10.94.0.0/24", bridge="icri0", plugin_dir=None):
        self.workdir = workdir
        self.plugin_dir = plugin_dir
        self.evidence = os.path.join(workdir, "plugin-calls.log")
        self.root = os.path.join(workdir, "root")
        self.state = os.path.join(workdir, "state")
        self.socket = os.path.join(workdir, "containerd.sock")
        self.cni_bin = os.path.join(workdir, "cni-bin")
        self.cni_conf = os.path.join(workdir, "net.d")
        self.ipam_dir = os.path.join(workdir, "ipam")
        self.bridge = bridge
        self.subnet = subnet
        self.proc = None
        self.log = None
        self.ip_forward = None      # the bridge plugin (isGateway) turns forwarding on
        self.netns_before = set()   # /run/netns before start: what is new at stop is ours

    def primary_path(self):
        return os.path.join(self.cni_conf, "10-bridge.conflist")

    def write_primary(self, extra=None):
        doc = bridge_conflist(self.subnet, self.bridge, self.ipam_dir)
        if extra:
            doc.update(extra)
        tmp = self.primary_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.primary_path())

    def start(self):
        self.netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            self.ip_forward = f.read()
        for d in (self.root, self.state, self.cni_bin, self.cni_conf, self.ipam_dir):
            os.makedirs(d, exist_ok=True)
        for name in ("bridge", "host-local", "loopback"):
            os.symlink(os.path.join(SYSTEM_PLUGINS, name), os.path.join(self.cni_bin, name))
        if self.plugin_dir:
            wrapper = os.path.join(self.cni_bin, "interceptor-cni")
            with open(wrapper, "w") as f:
                f.write(NO_PYTHON_WRAPPER.format(evidence=self.evidence,
                                                 plugin=os.path.join(self.plugin_dir, "interceptor-cni")))
            os.chmod(wrapper, 0o755)
        self.write_primary()
        config = os.path.join(self.workdir, "config.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(root=self.root, state=self.state, socket=self.socket, image=PAUSE_IMAGE,
                                  cni_bin=self.cni_bin, cni_conf=self.cni_conf))
        self.log = open(os.path.join(self.workdir, "containerd.log"), "w")
        # the plugin runs with containerd's environment: the tests' pin root and run dir
        self.proc = subprocess.Popen(["containerd", "--config", config], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ))
        for _ in range(200):
            if os.path.exists(self.socket) and self.ctr("version", check=False).returncode == 0:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.tail_log()}")
            time.sleep(0.05)
        image = build_pause_image(self.workdir)
        self.ctr("-n", "k8s.io", "images", "import", "--snapshotter", "native",
                 "--platform", "linux/amd64", image)
        return self

    def plugin_calls(self):
        """[(CNI command, "python-absent" or "python-present")] of every call so far."""
        try:
            with open(self.evidence) as f:
                return [tuple(line.split()) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def ctr(self, *args, check=True):
        return subprocess.run(["ctr", "--address", self.socket, *args], capture_output=True, text=True,
                              check=check, timeout=60)

    def tail_log(self, n=30):
        with open(os.path.join(self.workdir, "containerd.log")) as f:
            return "".join(f.readlines()[-n:])

    def _own_shims(self):
        """PIDs of this containerd's runc shims (their command line names our socket) and
        of the containers' processes they started (their children), children first."""
        shims, parents = [], {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and self.socket.encode() in argv:
                shims.append(int(pid))
        return [pid for pid, ppid in parents.items() if ppid in shims] + shims

    def runtime(self):
        from interceptor.agent import cri
        return cri.Runtime(self.socket)

    def stop(self):
        """Every sandbox stopped and removed (the kubelet's way), then containerd, by PID."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                with self.runtime() as rt:
                    for sid in rt.sandbox_ids(ready_only=False):
                        rt.stop_sandbox(sid)
                        rt.remove_sandbox(sid)
            except Exception:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        # a containerd that could not stop its sandboxes (a test broke its CNI) leaves
        # their shims and network namespaces: end those shims by PID, drop those netns
        for pid in self._own_shims():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = set(os.listdir("/run/netns")) - self.netns_before if os.path.isdir("/run/netns") else set()
        for name in sorted(left):
            if name.startswith("cni-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.ip_forward is not None:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write(self.ip_forward)
        # containerd leaves its shim sockets and mounts under state/root; unmount what stays
        for line in reversed(open("/proc/self/mounts").read().splitlines()):
            mnt = line.split()[1]
            if mnt.startswith(self.workdir):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
