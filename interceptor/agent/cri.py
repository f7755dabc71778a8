"""A small client of the container runtime's CRI (runtime.v1.RuntimeService) over its
unix socket: what the agent needs to find pod sandboxes (and what the tests need to
drive a runtime as the kubelet does). Messages are encoded by protowire.py, with the
field numbers of the public CRI API definition."""
import dataclasses
import json

from interceptor.agent import protowire as pw

SERVICE = "/runtime.v1.RuntimeService/"
SANDBOX_READY = 0


class CriError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Sandbox:
    id: str
    namespace: str
    name: str
    uid: str
    annotations: dict
    netns: str | None       # the network namespace path (from the verbose status)
    ready: bool


class Runtime:
    def __init__(self, socket_path, timeout=10):
        import grpc      # only the agent and the tests need it: never on the CNI path
        self._grpc = grpc
        self.socket_path = socket_path
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, fields):
        rpc = self.channel.unary_unary(SERVICE + method, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
        try:
            return pw.decode(rpc(pw.encode(fields), timeout=self.timeout))
        except self._grpc.RpcError as exc:
            raise CriError(f"CRI {method} on {self.socket_path}: {exc.code().name}: {exc.details()}") from None

    # --- what the agent uses ---------------------------------------------------------------
    def version(self):
        msg = self._call("Version", [(1, "v1")])
        return pw.text(msg, 2), pw.text(msg, 3)       # runtime name, runtime version

    def sandbox_ids(self, ready_only=True):
        fltr = [(2, [(1, SANDBOX_READY)])] if ready_only else []
        msg = self._call("ListPodSandbox", [(1, fltr)])
        return [pw.text(pw.decode(item), 1) for item in msg.get(1, [])]

    def sandbox(self, sandbox_id):
        msg = self._call("PodSandboxStatus", [(1, sandbox_id), (2, True)])
        status = pw.decode(pw.first(msg, 1, b""))
        meta = pw.decode(pw.first(status, 2, b""))
        return Sandbox(id=pw.text(status, 1), name=pw.text(meta, 1), uid=pw.text(meta, 2),
                       namespace=pw.text(meta, 3), annotations=pw.string_map(status, 8),
                       netns=_netns_path(pw.string_map(msg, 2)),
                       ready=pw.first(status, 3, 0) == SANDBOX_READY)

    def ready_sandboxes(self):
        out = []
        for sandbox_id in self.sandbox_ids():
            try:
                out.append(self.sandbox(sandbox_id))
            except CriError:
                continue     # removed meanwhile
        return out

    # --- what a kubelet does (the tests) ------------------------------------------------------
    def run_sandbox(self, namespace, name, uid, annotations=None, labels=None, attempt=0):
        metadata = [(1, name), (2, uid), (3, namespace), (4, attempt)]
        config = [(1, metadata), (2, name), (6, labels or {}), (7, annotations or {})]
        msg = self._call("RunPodSandbox", [(1, config)])
        return pw.text(msg, 1)

    def stop_sandbox(self, sandbox_id):
        self._call("StopPodSandbox", [(1, sandbox_id)])

    def remove_sandbox(self, sandbox_id):
        self._call("RemovePodSandbox", [(1, sandbox_id)])


def _netns_path(info):
    """containerd puts the sandbox's OCI spec in the verbose info ("info" key, JSON); the
    network namespace's path is in its linux.namespaces."""
    try:
        spec = json.loads(info.get("info", "{}")).get("runtimeSpec") or {}
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return ns["path"]
    except (ValueError, AttributeError):
        pass
    return None
