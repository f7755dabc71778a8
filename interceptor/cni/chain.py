"""The CNI chain the node agent keeps: a copy of the primary CNI's configuration with
interceptor-cni appended, written under a name of our own that sorts before the
primary's, so runtimes (libcni takes the first file in lexical order) use it.

Why a copy, not an edit of the primary's file (what `interceptor cni install` does on a
hand-made node): the primary CNI owns its file and rewrites it when it likes (Calico,
Cilium and aws-vpc-cni do, the last by rename). An edit races those rewrites (a
read-modify-write can undo the primary's change) and is lost with each one; uninstall
would have to edit the primary's file again. A copy is only ever written by us: when the
primary changes its file the copy is regenerated from it, when the primary's file goes
the copy goes too (pods must not start on a network the primary no longer configures),
and uninstall deletes one file. The cost: our file must sort first. `00-interceptor`
sorts before every name in use we know of; a primary that sorts before it is reported
(the agent is not ready) rather than silently not chained.
"""
import dataclasses
import json
import os

from interceptor import store
from interceptor.cni import defaults as cni_defaults
from interceptor.cni.install import CONF_EXTENSIONS, PLUGIN_TYPE, plugin_entry

OWNED_NAME = cni_defaults.CHAIN_NAME
SOURCE_KEY = "interceptorChainedFrom"     # in our entry: the primary file this copy was made from
SKIPPED_SUFFIXES = (".interceptor-backup",)


@dataclasses.dataclass(frozen=True)
class ChainState:
    primary: str | None       # the primary's file, None when there is none yet
    owned: str                # our file's path
    in_place: bool            # our file exists, made from the current primary
    problem: str | None       # why the chain is not in place
    action: str | None = None  # what this sync did, None when nothing


def primary_config(conf_dir, owned_name=OWNED_NAME):
    """The file the runtime would use if ours were not there."""
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return None
    for name in names:
        if name == owned_name or not name.endswith(CONF_EXTENSIONS) or name.startswith("."):
            continue
        return os.path.join(conf_dir, name)
    return None


def chained(primary_path, entry):
    """Our configuration made from the primary's: its plugins (an interceptor entry a
    hand install left there is dropped: never two), then ours."""
    with open(primary_path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if "plugins" in doc:
        if not isinstance(doc["plugins"], list):
            raise ValueError("plugins is not a list")
        top = {k: v for k, v in doc.items() if k != "plugins"}
        plugins = [p for p in doc["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    else:      # a single-plugin .conf
        top = {k: doc[k] for k in ("cniVersion", "name") if k in doc}
        plugins = [{k: v for k, v in doc.items() if k not in ("cniVersion", "name")}]
    if not plugins:
        raise ValueError("no plugins")
    ours = dict(entry, type=PLUGIN_TYPE)
    ours[SOURCE_KEY] = os.path.basename(primary_path)
    return dict(top, cniVersion=top.get("cniVersion", "1.0.0"), plugins=plugins + [ours])


def _read(path):
    try:
        return store.read_json(path)
    except (OSError, ValueError):
        return None


def sync(conf_dir, entry=None, owned_name=OWNED_NAME):
    """Make our file match the current primary. Idempotent: writes only on a change."""
    entry = entry if entry is not None else plugin_entry()
    owned = os.path.join(conf_dir, owned_name)
    primary = primary_config(conf_dir, owned_name)
    if primary is None:
        action = f"removed {owned} (no primary configuration)" if store.remove(owned) else None
        return ChainState(None, owned, False, f"no primary CNI configuration in {conf_dir} yet", action)
    if os.path.basename(primary) < owned_name:
        action = f"removed {owned}" if store.remove(owned) else None
        return ChainState(primary, owned, False,
                          f"{os.path.basename(primary)} sorts before {owned_name}: runtimes would not use "
                          "the chain (give the agent a --cni-conf-name that sorts first)", action)
    try:
        want = chained(primary, entry)
    except (OSError, ValueError) as exc:
        # a primary mid-write (truncated, then written), or broken: keep what we have
        # until it is readable again; the write's end brings another look
        if os.path.exists(owned):
            return ChainState(primary, owned, True, None)
        return ChainState(primary, owned, False, f"cannot read {primary}: {exc}")
    if _read(owned) == want:
        return ChainState(primary, owned, True, None)
    existed = os.path.exists(owned)
    store.write_json(owned, want)     # atomic: the runtime sees the old file or the new one
    return ChainState(primary, owned, True, None,
                      f"{'re-chained' if existed else 'chained'} {os.path.basename(primary)} into {owned}")


def remove(conf_dir, owned_name=OWNED_NAME):
    owned = os.path.join(conf_dir, owned_name)
    doc = _read(owned)
    ours = isinstance(doc, dict) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
                                         for p in doc.get("plugins", []))
    if (ours or doc is None) and store.remove(owned):
        return [f"removed {owned}"]
    return []
