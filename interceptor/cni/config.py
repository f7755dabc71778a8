"""What a CNI request means for a pod: enroll or skip, and with which settings.

Pure logic over the plugin's network configuration, CNI_ARGS and the pod annotations
(containerd passes them in runtimeConfig through the io.kubernetes.cri.pod-annotations
capability). Every invalid value becomes a ConfigError naming the key or annotation it
came from, which the plugin reports as CNI error 7.
"""
from interceptor.pod import parsing
from interceptor.pod.podspec import BY_ANNOTATION, BY_CONFIG_KEY, PodSettings, SettingError

ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
INJECT_ANNOTATION = "sidecar.istio.io/inject"
STATUS_PORT_ANNOTATION = "status.sidecar.istio.io/port"


class ConfigError(Exception):
    pass


class Decision:
    def __init__(self, enroll, reason, settings=None, pod=None):
        self.enroll, self.reason, self.settings, self.pod = enroll, reason, settings, pod


def parse_cni_args(raw):
    """CNI_ARGS "K=V;K2=V2" -> dict."""
    out = {}
    for part in (raw or "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key] = value
    return out


def _settings_from_config(config):
    raw = {f.name: config[key] for key, f in BY_CONFIG_KEY.items() if key in config}
    try:
        return PodSettings(**raw)
    except SettingError as exc:
        raise ConfigError(f"config {exc.field.config_key}: {exc.detail}") from None


def _apply_annotations(settings, annotations):
    """The pod's annotations override the config, field by field (podspec.FIELDS)."""
    raw = {f.name: annotations[name] for name, f in BY_ANNOTATION.items() if name in annotations}
    try:
        if raw:
            settings = settings.replace(**raw)
    except SettingError as exc:
        raise ConfigError(f"annotation {exc.field.annotation}: {exc.detail}") from None
    if STATUS_PORT_ANNOTATION in annotations:
        try:
            status_port = parsing.port(annotations[STATUS_PORT_ANNOTATION])
        except ValueError as exc:
            raise ConfigError(f"annotation {STATUS_PORT_ANNOTATION}: {exc}") from None
        # the sidecar's status port must be reachable directly, as in Istio
        settings = settings.replace(exclude_inbound_ports=settings.exclude_inbound_ports + [status_port])
    return settings


def decide(config, cni_args):
    """Enroll this pod, and how? Raises ConfigError for invalid config or annotations."""
    namespace = cni_args.get("K8S_POD_NAMESPACE")
    name = cni_args.get("K8S_POD_NAME")
    pod = f"{namespace or '-'}/{name}" if name else None
    runtime = config.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise ConfigError("runtimeConfig: expected an object")
    annotations = runtime.get(ANNOTATIONS_CAPABILITY) or {}
    if not isinstance(annotations, dict):
        raise ConfigError(f"runtimeConfig {ANNOTATIONS_CAPABILITY}: expected an object")

    excluded = config.get("excludeNamespaces", ["kube-system"])
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise ConfigError("config excludeNamespaces: expected a list of namespaces")
    marker = config.get("sidecarMarker")
    if marker is not None and not isinstance(marker, str):
        raise ConfigError("config sidecarMarker: expected an annotation name")
    if not isinstance(config.get("enrollWithoutNamespace", True), bool):
        raise ConfigError("config enrollWithoutNamespace: expected true or false")
    settings = _settings_from_config(config)

    if namespace is None and not config.get("enrollWithoutNamespace", True):
        return Decision(False, "no pod namespace in CNI_ARGS (enrollWithoutNamespace is false)", pod=pod)
    if namespace in excluded:
        return Decision(False, f"namespace {namespace} is excluded", pod=pod)
    if str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false":
        return Decision(False, f"annotated {INJECT_ANNOTATION}: false", pod=pod)
    if marker and marker not in annotations:
        return Decision(False, f"no sidecar marker annotation {marker}", pod=pod)
    settings = _apply_annotations(settings, annotations)
    if settings.interception_mode == "NONE":
        mode = BY_CONFIG_KEY["interceptionMode"]
        return Decision(False, f"interception mode NONE ({mode.annotation})", pod=pod)
    return Decision(True, "enrolled", settings=settings, pod=pod)
