"""What a CNI request means for a pod: enroll or skip, and with which settings.

Pure logic over the plugin's network configuration, CNI_ARGS and the pod annotations
(containerd passes them in runtimeConfig through the io.kubernetes.cri.pod-annotations
capability). Every invalid value becomes a ConfigError naming the key or annotation it
came from, which the plugin reports as CNI error 7.
"""
from .enrollment import PodSettings

ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
INJECT_ANNOTATION = "sidecar.istio.io/inject"
BYPASS_ANNOTATION = "interceptor.io/bypass"
STATUS_PORT_ANNOTATION = "status.sidecar.istio.io/port"

# plugin config key -> PodSettings field
CONFIG_KEYS = {
    "proxyUID": "proxy_uid",
    "proxyGID": "proxy_gid",
    "outboundPort": "outbound_port",
    "inboundPort": "inbound_port",
    "includeOutboundCIDRs": "include_outbound_cidrs",
    "excludeOutboundCIDRs": "exclude_outbound_cidrs",
    "includeOutboundPorts": "include_outbound_ports",
    "excludeOutboundPorts": "exclude_outbound_ports",
    "includeInboundPorts": "include_inbound_ports",
    "excludeInboundPorts": "exclude_inbound_ports",
    "noProxy": "no_proxy",
    "bypass": "bypass",
    "ingressFilter": "ingress_filter",
    "protectedPorts": "protected_ports",
    "ingressPolicy": "ingress_policy",
    "ingressConflict": "ingress_conflict",
}

# Istio's per-pod annotations -> PodSettings field
ANNOTATION_KEYS = {
    "traffic.sidecar.istio.io/includeOutboundIPRanges": "include_outbound_cidrs",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": "exclude_outbound_cidrs",
    "traffic.sidecar.istio.io/includeOutboundPorts": "include_outbound_ports",
    "traffic.sidecar.istio.io/excludeOutboundPorts": "exclude_outbound_ports",
    "traffic.sidecar.istio.io/includeInboundPorts": "include_inbound_ports",
    "traffic.sidecar.istio.io/excludeInboundPorts": "exclude_inbound_ports",
    # ours: rules separated by ';' (see interceptor/ingress_policy.py), ports by ','
    "interceptor.io/ingress-policy": "ingress_policy",
    "interceptor.io/protected-ports": "protected_ports",
    "interceptor.io/ingress-filter": "ingress_filter",
}


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
    values = {}
    for key, field in CONFIG_KEYS.items():
        if key in config:
            values[field] = config[key]
    settings = PodSettings(**values)
    try:
        return settings.validate()
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        key = next((k for k, f in CONFIG_KEYS.items() if f == field), field)
        raise ConfigError(f"config {key}: {str(exc).split(': ', 1)[-1]}") from None


def _apply_annotations(settings, annotations):
    for name, field in ANNOTATION_KEYS.items():
        if name not in annotations:
            continue
        trial = settings.copy()
        setattr(trial, field, annotations[name])
        try:
            trial.validate()
        except ValueError as exc:
            raise ConfigError(f"annotation {name}: {str(exc).split(': ', 1)[-1]}") from None
        setattr(settings, field, getattr(trial, field))
    if STATUS_PORT_ANNOTATION in annotations:
        value = annotations[STATUS_PORT_ANNOTATION]
        try:
            port = int(value)
            if not 1 <= port <= 65535:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"annotation {STATUS_PORT_ANNOTATION}: {value!r} is not a port") from None
        # the sidecar's status port must be reachable directly, as in Istio
        settings.exclude_inbound_ports = sorted(set(settings.exclude_inbound_ports) | {port})
    if BYPASS_ANNOTATION in annotations:
        value = str(annotations[BYPASS_ANNOTATION]).lower()
        if value not in ("true", "false"):
            raise ConfigError(f"annotation {BYPASS_ANNOTATION}: {annotations[BYPASS_ANNOTATION]!r} "
                              "is not 'true' or 'false'")
        settings.bypass = value == "true"
    return settings


def decide(config, cni_args):
    """Enroll this pod, and how? Raises ConfigError for invalid config or annotations."""
    namespace = cni_args.get("K8S_POD_NAMESPACE")
    name = cni_args.get("K8S_POD_NAME")
    pod = f"{namespace or '-'}/{name}" if name else None
    annotations = (config.get("runtimeConfig") or {}).get(ANNOTATIONS_CAPABILITY) or {}
    if not isinstance(annotations, dict):
        raise ConfigError(f"runtimeConfig {ANNOTATIONS_CAPABILITY}: expected an object")

    excluded = config.get("excludeNamespaces", ["kube-system"])
    if not isinstance(excluded, list):
        raise ConfigError("config excludeNamespaces: expected a list of namespaces")
    marker = config.get("sidecarMarker")
    settings = _settings_from_config(config)

    if namespace is None and not config.get("enrollWithoutNamespace", True):
        return Decision(False, "no pod namespace in CNI_ARGS (enrollWithoutNamespace is false)", pod=pod)
    if namespace in excluded:
        return Decision(False, f"namespace {namespace} is excluded", pod=pod)
    if str(annotations.get(INJECT_ANNOTATION, "")).lower() == "false":
        return Decision(False, f"annotated {INJECT_ANNOTATION}: false", pod=pod)
    if marker and marker not in annotations:
        return Decision(False, f"no sidecar marker annotation {marker}", pod=pod)
    return Decision(True, "enrolled", settings=_apply_annotations(settings, annotations), pod=pod)
