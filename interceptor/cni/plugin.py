"""`interceptor-cni`: the CNI chained plugin (spec 0.3.0 - 1.1.0).

Stdout carries exactly one JSON document, the result or the error; logs go to stderr and
the log file. The request is validated once, here at the edge, before anything is
changed, so a malformed request leaves nothing behind. Imports are lazy and nothing on
this path compiles or imports BCC: the runtime calls VERSION before every ADD and DEL.

`run` is the whole plugin: the installed front (cni/front.c) has the node agent call it
in-process (server.py) and runs this module itself only when the agent cannot.
"""
import json
import os
import sys
import time

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = SUPPORTED_VERSIONS[-1]
DEFAULT_LOG = "/var/log/interceptor-cni.log"
LOG_DIR = "/var/log"      # a configured logFile must stay under it

# Error codes of the CNI spec; ours for CHECK (100+) are interceptor.pod.problems.Kind.
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_PLUGIN_NOT_AVAILABLE = 50
E_INTERNAL = 999

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
LOCATION_KEYS = (("pinRoot", "INTERCEPTOR_PIN_ROOT"), ("runDir", "INTERCEPTOR_RUN_DIR"))


class CniError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _is_semver(v):
    # (no `re`: it costs milliseconds of import on every call)
    parts = v.split(".") if isinstance(v, str) else []
    return len(parts) == 3 and all(p.isdigit() for p in parts)


def _version_tuple(v):
    return tuple(int(x) for x in v.split("."))


class Configuration:
    """The request's network configuration, decoded once (the agent's server, run() and
    Request all read it): doc, the document ({} when it did not decode), and error, the
    CniError decoding raised (None when it decoded)."""
    __slots__ = ("doc", "error")

    def __init__(self, stdin_text):
        try:
            self.doc, self.error = _decode(stdin_text), None
        except CniError as exc:
            self.doc, self.error = {}, exc

    @property
    def as_dict(self):
        """The document when it is a JSON object, else {}."""
        return self.doc if isinstance(self.doc, dict) else {}

    def requested_version(self):
        """Its cniVersion when it is a supported one, for encoding errors in it."""
        version = self.as_dict.get("cniVersion")
        return version if version in SUPPORTED_VERSIONS else LATEST


class Request:
    """The validated request: environment and network configuration."""

    def __init__(self, environ, configuration):
        self.command = environ.get("CNI_COMMAND", "")
        if self.command not in COMMANDS:
            raise CniError(E_INVALID_ENV, f"CNI_COMMAND {self.command or '(unset)'} is not one of "
                           f"{', '.join(COMMANDS)}")
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")
        self.raw_args = environ.get("CNI_ARGS", "")
        self.cni_version = LATEST
        if configuration.error:
            raise configuration.error
        self.config = configuration.doc
        if not isinstance(self.config, dict):
            raise CniError(E_DECODE, "network configuration must be a JSON object")
        version = self.config.get("cniVersion")
        if self.command == "VERSION":
            if isinstance(version, str) and version in SUPPORTED_VERSIONS:
                self.cni_version = version
            return
        if not _is_semver(version):
            raise CniError(E_INVALID_CONFIG, "network configuration has no valid cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CniError(E_INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported",
                           f"supported: {', '.join(SUPPORTED_VERSIONS)}")
        self.cni_version = version
        minimum = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(self.command)
        if minimum and _version_tuple(version) < _version_tuple(minimum):
            raise CniError(E_INCOMPATIBLE_VERSION,
                           f"{self.command} needs cniVersion {minimum} or later, got {version}")
        if self.command in ("ADD", "DEL", "CHECK"):
            self._validate_container_env()

    def _validate_container_env(self):
        missing = [name for name, value in (("CNI_CONTAINERID", self.container_id),
                                            ("CNI_IFNAME", self.ifname)) if not value]
        if self.command != "DEL" and not self.netns:
            missing.append("CNI_NETNS")   # DEL may come after the namespace is gone
        if missing:
            raise CniError(E_INVALID_ENV, f"missing {', '.join(missing)}")
        if not (set(self.container_id) <= _ID_CHARS and self.container_id[0].isalnum()):
            raise CniError(E_INVALID_ENV, f"CNI_CONTAINERID {self.container_id!r} is not a valid ID")
        if len(self.ifname) > 15 or "/" in self.ifname or self.ifname in (".", ".."):
            raise CniError(E_INVALID_ENV, f"CNI_IFNAME {self.ifname!r} is not a valid interface name")
        if self.netns and not os.path.isabs(self.netns):
            raise CniError(E_INVALID_ENV, f"CNI_NETNS {self.netns!r} is not an absolute path")


class Log:
    """Plain lines to stderr and the log file; the logging module costs start-up time."""

    def __init__(self, config, environ, err):
        configured = config.get("logFile")
        self.path = environ.get("INTERCEPTOR_CNI_LOG") or \
            (configured if _a_log_path(configured) else DEFAULT_LOG)
        self.err = err

    def __call__(self, msg):
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{os.getpid()}] {msg}\n"
        # names and values from the request may hold anything, lone surrogates included
        line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        self.err.write(line)
        try:
            # a symlink planted where the log goes is not followed
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            pass   # a log file we cannot write must not fail the pod


def _a_log_path(path):
    """A configured logFile is used only as a plain absolute path under LOG_DIR: the
    plugin runs as root, and a relative path would land in the runtime's working dir,
    one with .. or outside /var/log could append to any file on the node."""
    return isinstance(path, str) and os.path.isabs(path) and "\0" not in path and \
        os.path.normpath(path) == path and path.startswith(LOG_DIR + "/")


def _prev_result_addresses(prev):
    """The pod's addresses from the interface plugin's result (CIDR notation)."""
    import ipaddress
    ips = prev.get("ips") or []
    if not isinstance(ips, list):
        raise CniError(E_INVALID_CONFIG, "prevResult ips: expected a list")
    out = []
    for i, ip in enumerate(ips):
        address = ip.get("address") if isinstance(ip, dict) else None
        try:
            if not isinstance(address, str):   # ipaddress would take 1 or true as 0.0.0.1
                raise ValueError
            out.append(ipaddress.ip_interface(address).ip)
        except ValueError:
            raise CniError(E_INVALID_CONFIG, f"prevResult ips[{i}].address: {str(address)[:60]!r} "
                           "is not an address with prefix length") from None
    return out


def cmd_add(req, log):
    from interceptor.datapath.maps import MapFullError
    from interceptor.ops import enrollment
    from interceptor.cni import config as cni_config
    prev = req.config.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(E_INVALID_CONFIG, "no prevResult: interceptor-cni must be chained after "
                       "an interface plugin (e.g. bridge) in a conflist")
    try:
        decision = cni_config.decide(req.config, cni_config.parse_cni_args(req.raw_args))
    except cni_config.ConfigError as exc:
        raise CniError(E_INVALID_CONFIG, str(exc)) from None
    result = dict(prev, cniVersion=req.cni_version)
    if not decision.enroll:
        log(f"ADD {req.container_id}: skipped ({decision.reason})")
        return result
    if not os.path.exists(req.netns):
        raise CniError(E_UNKNOWN_CONTAINER, f"network namespace {req.netns} does not exist")
    addresses = _prev_result_addresses(prev) or None
    try:
        rec = enrollment.enroll(req.netns, decision.settings, pod=decision.pod,
                                addresses=addresses, container_id=req.container_id,
                                ifname=req.ifname)
    except enrollment.NotLoadedError as exc:
        raise CniError(E_TRY_AGAIN, str(exc), "run `interceptor load` on the node") from None
    except MapFullError as exc:      # nothing of the pod is left; fine again once pods go
        raise CniError(E_TRY_AGAIN, f"enroll failed: {exc}") from None
    except enrollment.EnrollError as exc:
        raise CniError(E_INVALID_CONFIG, str(exc)) from None
    except OSError as exc:
        raise CniError(E_IO, f"enroll failed: {exc}") from None
    log(f"ADD {req.container_id}: enrolled {decision.pod or req.netns} (cookie {rec.cookie}, "
        f"{', '.join(rec.addresses)})")
    return result


def cmd_del(req, log):
    from interceptor.ops import enrollment
    try:
        removed = enrollment.unenroll_container(req.container_id, req.ifname)
    except OSError as exc:
        raise CniError(E_TRY_AGAIN, f"removing {req.container_id} failed: {exc}") from None
    log(f"DEL {req.container_id}: removed {len(removed)} enrollment(s)")
    return None


def cmd_check(req, log):
    from interceptor.pod.problems import Kind
    from interceptor.ops import enrollment
    rec = enrollment.find_container(req.container_id, req.ifname)
    if rec is None:
        from interceptor.cni import config as cni_config
        try:
            decision = cni_config.decide(req.config, cni_config.parse_cni_args(req.raw_args))
        except cni_config.ConfigError as exc:
            raise CniError(E_INVALID_CONFIG, str(exc)) from None
        if not decision.enroll:
            return None   # skipped at ADD, nothing to verify
        raise CniError(Kind.NOT_ENROLLED, f"container {req.container_id} is not enrolled")
    problems = enrollment.verify(rec, req.netns)
    if problems:
        raise CniError(problems[0].kind, f"container {req.container_id}: {problems[0]}",
                       "; ".join(map(str, problems)))
    log(f"CHECK {req.container_id}: ok")
    return None


def cmd_gc(req, log):
    from interceptor.ops import enrollment
    valid = req.config.get("cni.dev/valid-attachments")
    if valid is None:
        valid = req.config.get("cni.dev/attachments", [])
    if not isinstance(valid, list):
        raise CniError(E_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    keep = set()
    for item in valid:
        if not isinstance(item, dict) or "containerID" not in item:
            raise CniError(E_INVALID_CONFIG, "each valid attachment needs a containerID")
        keep.add((item["containerID"], item.get("ifname")))
    removed = enrollment.garbage_collect(keep)
    log(f"GC: removed {len(removed)} stale enrollment(s)")
    return None


def cmd_status(req, log):
    from interceptor.datapath.node_state import is_loaded
    if not is_loaded():
        raise CniError(E_PLUGIN_NOT_AVAILABLE, "the interceptor datapath is not loaded on this node",
                       "run `interceptor load`")
    return None


def run(environ, stdin_text, err=None, fixed_locations=False, configuration=None):
    """Returns (exit code, stdout document or None). err: where log lines and tracebacks
    go (stderr). fixed_locations: the caller has checked that the request resolves to
    this process's pin root and run dir (locations()), the node agent's case; otherwise
    they are set from the configuration before anything reads them. configuration: the
    stdin already decoded (Configuration), by a caller that needed it first."""
    err = err or sys.stderr
    config = {}
    configuration = configuration or Configuration(stdin_text)
    version = configuration.requested_version()
    try:
        req = Request(environ, configuration)
        config, version = req.config, req.cni_version
        if req.command == "VERSION":
            return 0, {"cniVersion": req.cni_version, "supportedVersions": SUPPORTED_VERSIONS}
        _check_locations(config)
        if not fixed_locations:
            for key, env in LOCATION_KEYS:
                if config.get(key) is not None:
                    os.environ[env] = config[key]
        log = Log(config, environ, err)
        handler = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc,
                   "STATUS": cmd_status}[req.command]
        started = time.monotonic()
        ok = False
        try:
            result = handler(req, log)
            ok = True
            return 0, result
        finally:
            from interceptor import store
            from interceptor.ops import opstats
            if not isinstance(sys.exc_info()[1], store.DeadlinePassed):
                opstats.record(f"cni {req.command}", ok, time.monotonic() - started)
    except CniError as exc:
        return 1, _error_doc(config, environ, err, version, exc)
    except Exception as exc:   # a bug: still answer in the spec's format, never a bare traceback
        from interceptor.store import DeadlinePassed
        if isinstance(exc, DeadlinePassed):
            raise              # not done, and no answer: the sender has taken over (cni_server)
        from interceptor.datapath.maps import LayoutError
        if isinstance(exc, LayoutError):   # a datapath of another version: mid-upgrade
            return 1, _error_doc(config, environ, err, version, CniError(E_TRY_AGAIN, str(exc)))
        import traceback
        traceback.print_exc(file=err)
        return 1, _error_doc(config, environ, err, version, CniError(E_INTERNAL, f"internal error: {exc}"))


def _check_locations(config):
    """pinRoot / runDir in the network configuration: where the node loader keeps its
    pins and state, when not the defaults (runtimes do not reliably pass their
    environment on to plugins)."""
    for key, _ in LOCATION_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
            raise CniError(E_INVALID_CONFIG, f"config {key}: {value!r} is not an absolute path")


def locations(environ, config):
    """(pin root, run dir) a request resolves to: the configuration's, else the
    environment's, else the defaults. (Set in os.environ before interceptor.paths is
    imported, when the plugin runs on its own.)"""
    from interceptor.paths import DEFAULT_PIN_ROOT, DEFAULT_RUN_DIR
    out = []
    for (key, env), default in zip(LOCATION_KEYS, (DEFAULT_PIN_ROOT, DEFAULT_RUN_DIR)):
        value = config.get(key)
        out.append(value if isinstance(value, str) and value else environ.get(env) or default)
    return tuple(out)


def _decode(stdin_text):
    """The network configuration document (from str or bytes). Any input gets CNI error
    6, never a traceback: nesting thousands deep exhausts the parser's recursion."""
    try:
        return json.loads(stdin_text) if stdin_text.strip() else {}
    except ValueError as exc:
        raise CniError(E_DECODE, "network configuration is not valid JSON", str(exc)[:200]) from None
    except RecursionError:
        raise CniError(E_DECODE, "network configuration is nested too deeply") from None


def _error_doc(config, environ, stream, version, err):
    Log(config if isinstance(config, dict) else {}, environ, stream)(f"error {err.code}: {err.msg}")
    doc = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        doc["details"] = err.details
    return doc


def main():
    # bytes: invalid UTF-8 is then the JSON decoder's error (code 6), whatever the locale
    code, doc = run(os.environ, sys.stdin.buffer.read() if not sys.stdin.isatty() else b"")
    if doc is not None:
        sys.stdout.write(json.dumps(doc) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
