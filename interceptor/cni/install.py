"""`interceptor cni install|uninstall`: put the plugin on a node and chain it into the
active network configuration, and take out exactly that again.

The active configuration is the first file in lexical order with a name the runtime
loads (.conf, .conflist, .json), as libcni picks it. A single-plugin .conf is converted
into a .conflist. Install keeps a backup of the file it changed, under a name runtimes do
not load, and records in its own plugin entry what uninstall must undo.
"""
import functools
import hashlib
import importlib.util
import io
import json
import marshal
import os
import struct
import sys
import zipfile
from enum import StrEnum

from interceptor import store
from interceptor.cni import defaults as cni_defaults

PLUGIN_TYPE = "interceptor-cni"
DEFAULT_BIN_DIR, DEFAULT_CONF_DIR = cni_defaults.BIN_DIR, cni_defaults.CONF_DIR
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
BACKUP_SUFFIX = ".interceptor-backup"
INSTALL_KEY = "interceptorInstall"    # in our entry: what uninstall must undo
HERE = os.path.dirname(os.path.abspath(__file__))      # interceptor/cni
PACKAGE_DIR = os.path.dirname(HERE)                      # interceptor



class Runner(StrEnum):
    """What runs the plugin on the node, chosen at install time (never by looking for an
    interpreter when a request comes)."""
    # the static front (front.c) alone, needing nothing from the host: the node agent
    # answers; while it cannot, ADD and CHECK fail closed (CNI error 11), DEL succeeds
    AGENT = "agent"
    # the plugin runs itself: a zip of the package's modules behind a shebang naming the
    # Python that installed it, for a node set up by hand without an agent
    PYTHON = "python"


FRONT = os.path.join(HERE, "front")            # built from front.c beside it (front.py)
# The python runner's zip: every module but the harness's, run with no site packages
# (-S), so it imports only the standard library (that saves about 5 ms on every call).
ZIP_LEAVES_OUT = {"harness", "bpf", "__pycache__"}
ZIP_MAIN = "import sys\nfrom interceptor.cni.plugin import main\nsys.exit(main())\n"


class InstallError(Exception):
    pass


def active_config(conf_dir):
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CONF_EXTENSIONS))
    except FileNotFoundError:
        names = []
    if not names:
        raise InstallError(f"{conf_dir} holds no network configuration (*.conf, *.conflist, "
                           "*.json): install the interface plugin's configuration first")
    return os.path.join(conf_dir, names[0])


def _our_entry(plugins):
    return next((p for p in plugins if p.get("type") == PLUGIN_TYPE), None)


@functools.lru_cache(maxsize=1)
def _sources():
    """{zip name: source bytes} of the plugin (read once: a process's package does not
    change under it, and the agent asks on every reconcile pass)."""
    out = {"__main__.py": ZIP_MAIN.encode(),
           "interceptor/__init__.py": b""}      # zipimport has no namespace packages
    for folder, dirs, files in os.walk(PACKAGE_DIR):
        # what a node runs: the harness (bench/ inside it) and the C sources stay out
        dirs[:] = sorted(d for d in dirs if d not in ZIP_LEAVES_OUT)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out["interceptor/" + os.path.relpath(path, PACKAGE_DIR)] = f.read()
    return out


def _front():
    try:
        with open(FRONT, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InstallError(f"the plugin's front is not built ({FRONT}): python3 -m interceptor.cni.front, "
                           "or install the plugin with --runner python") from None


def _shebang():
    return f"#!{sys.executable} -S\n".encode()


def _fingerprint(sources, head):
    h = hashlib.sha256(hashlib.sha256(head).digest())
    for name, data in sorted(sources.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest().encode()


@functools.lru_cache(maxsize=2)
def fingerprint_of_this(runner):
    """What installed_fingerprint says of this version's plugin for this runner."""
    if runner == Runner.AGENT:
        return hashlib.sha256(_front()).hexdigest().encode()
    return _fingerprint(_sources(), _shebang())


def plugin_binary(runner):
    """The plugin executable's bytes. AGENT: the static front. PYTHON: a shebang, then a
    zip of the package's modules, each with its bytecode (unchecked-hash .pyc: compiling
    on every call would cost ~10 ms; a Python of another version ignores them and
    compiles); the zip's comment is a fingerprint of both."""
    if runner == Runner.AGENT:
        return _front()
    sources = _sources()
    buf = io.BytesIO()
    buf.write(_shebang())
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name, data):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        for name, data in sources.items():
            add(name, data)
            if name.startswith("interceptor/"):
                add(name + "c", _bytecode(name, data))
        z.comment = _fingerprint(sources, _shebang())
    return buf.getvalue()


def _bytecode(name, source):
    code = compile(source, name, "exec", dont_inherit=True)
    return importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b01) + \
        importlib.util.source_hash(source) + marshal.dumps(code)     # PEP 552, unchecked


def installed_fingerprint(binary):
    """The zip's comment of a python-runner plugin, the digest of any other file; None
    when there is none."""
    try:
        with zipfile.ZipFile(binary) as z:
            return z.comment
    except zipfile.BadZipFile:
        with open(binary, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest().encode()
    except OSError:
        return None


def install_binary(bin_dir, runner):
    """Put the plugin in bin_dir (atomically); [] when this one is there already."""
    os.makedirs(bin_dir, exist_ok=True)
    binary = os.path.join(bin_dir, PLUGIN_TYPE)
    if installed_fingerprint(binary) == fingerprint_of_this(runner):
        return []
    tmp = f"{binary}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(plugin_binary(runner))
    os.chmod(tmp, 0o755)
    os.replace(tmp, binary)
    return [f"installed {binary} (runner: {runner})"]


def remove_binary(bin_dir):
    binary = os.path.join(bin_dir, PLUGIN_TYPE)
    if os.path.exists(binary):
        os.unlink(binary)
        return [f"removed {binary}"]
    return []


def plugin_entry():
    """The chained entry install appends: Istio-compatible defaults, and the annotations
    capability so containerd passes pod annotations."""
    return {"type": PLUGIN_TYPE, "capabilities": {"io.kubernetes.cri.pod-annotations": True},
            "excludeNamespaces": ["kube-system"], "logFile": "/var/log/interceptor-cni.log"}


def install(bin_dir=DEFAULT_BIN_DIR, conf_dir=DEFAULT_CONF_DIR, runner=Runner.PYTHON):
    """Returns a list of what was done (empty when everything was already in place)."""
    done = []
    path = active_config(conf_dir)
    done += install_binary(bin_dir, runner)

    with open(path) as f:
        doc = json.load(f)
    if "plugins" in doc:
        if _our_entry(doc["plugins"]) is not None:
            return done
        entry = plugin_entry()
        entry[INSTALL_KEY] = {"backup": os.path.basename(path) + BACKUP_SUFFIX}
        _backup(path)
        doc["plugins"].append(entry)
        store.write_json(path, doc)
        done.append(f"chained {PLUGIN_TYPE} into {path}")
        return done
    # a single-plugin .conf: turn it into a .conflist holding it and us
    base = os.path.splitext(path)[0]
    new_path = base + ".conflist"
    if os.path.exists(new_path):
        raise InstallError(f"cannot convert {path}: {new_path} already exists")
    entry = plugin_entry()
    entry[INSTALL_KEY] = {"converted_from": os.path.basename(path),
                          "backup": os.path.basename(path) + BACKUP_SUFFIX}
    conflist = {"cniVersion": doc.get("cniVersion", "1.0.0"), "name": doc.get("name", "default"),
                "plugins": [{k: v for k, v in doc.items() if k not in ("cniVersion", "name")}, entry]}
    _backup(path)
    store.write_json(new_path, conflist)
    os.unlink(path)
    done.append(f"converted {path} into {new_path} with {PLUGIN_TYPE} chained")
    return done


def _json_of(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _backup(path):
    with open(path, "rb") as src, open(path + BACKUP_SUFFIX, "wb") as dst:
        dst.write(src.read())


def uninstall(bin_dir=DEFAULT_BIN_DIR, conf_dir=DEFAULT_CONF_DIR):
    done = []
    for name in sorted(os.listdir(conf_dir)) if os.path.isdir(conf_dir) else []:
        if not name.endswith(CONF_EXTENSIONS):
            continue
        path = os.path.join(conf_dir, name)
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        entry = _our_entry(doc.get("plugins", [])) if isinstance(doc, dict) else None
        if entry is None:
            continue
        record = entry.get(INSTALL_KEY, {})
        backup = os.path.join(conf_dir, record.get("backup", name + BACKUP_SUFFIX))
        if record.get("converted_from"):
            original = os.path.join(conf_dir, record["converted_from"])
            if os.path.exists(backup):     # byte for byte what was there before
                os.replace(backup, original)
            else:
                doc["plugins"].remove(entry)
                store.write_json(original, dict(doc["plugins"][0], cniVersion=doc["cniVersion"],
                                           name=doc["name"]))
            os.unlink(path)
            done.append(f"restored {original}")
        else:
            doc["plugins"].remove(entry)
            if _json_of(backup) == doc:     # nothing else changed since: byte for byte back
                os.replace(backup, path)
            else:
                store.write_json(path, doc)
            done.append(f"removed {PLUGIN_TYPE} from {path}")
        if os.path.exists(backup):
            os.unlink(backup)
    done += remove_binary(bin_dir)
    if not done and not any(n.endswith(CONF_EXTENSIONS) for n in
                            (os.listdir(conf_dir) if os.path.isdir(conf_dir) else [])):
        raise InstallError(f"{conf_dir} holds no network configuration")
    return done

