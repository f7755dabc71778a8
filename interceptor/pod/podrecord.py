"""One enrolled pod's record, typed: what was asked (settings), where (netns, cookie),
and the journal of datapath pieces applied for it (interceptor/pieces/).

The record is written before the first piece is applied and after each one, so a run
killed at any point leaves a record that says what may be in place: removal undoes the
journal in reverse, and a piece recorded without its state is removed by sweeping what
it could have made. Stored as JSON in /run/interceptor/pods/<cookie>.json.
"""
import os
import time

from interceptor import paths, store
from interceptor.pod.podspec import PodSettings, SettingError


# Plain classes, not dataclasses: this is on every CNI call, and `dataclasses` imports
# `inspect` (~14 ms).
class JournalEntry:
    __slots__ = ("piece", "state")

    def __init__(self, piece, state=None):
        self.piece = piece            # a pieces.BY_NAME key
        self.state = state            # what the piece recorded; None: begun, not finished

    def __repr__(self):
        return f"JournalEntry({self.piece!r}, {self.state!r})"


class PodRecord:
    __slots__ = ("cookie", "netns", "settings", "mode", "pod", "container_id", "ifname",
                 "addresses", "enrolled_at", "journal", "complete", "damaged", "policy_pending")

    def __init__(self, cookie, netns, settings, mode, pod=None, container_id=None, ifname=None,
                 addresses=None, enrolled_at=None, journal=None, complete=False, damaged=None,
                 policy_pending=None):
        self.cookie = cookie
        self.netns = netns
        self.settings = settings          # PodSettings
        self.mode = mode                  # {"outbound": "ebpf"|"rules", "inbound": ...} at enroll
        self.pod = pod                    # namespace/name, when a runtime or the CLI named it
        self.container_id = container_id
        self.ifname = ifname
        self.addresses = list(addresses or [])     # strings
        self.enrolled_at = time.time() if enrolled_at is None else enrolled_at
        self.journal = list(journal or [])         # JournalEntry, in order
        self.complete = complete
        self.damaged = damaged            # why the stored file could not be read as a record
        # the rules (texts) of a live policy edit under way: recorded before the filter's
        # entries change, cleared once they hold it, so one killed half-way is known
        self.policy_pending = policy_pending

    def __repr__(self):
        return f"PodRecord(cookie={self.cookie}, pod={self.pod!r}, complete={self.complete})"

    @property
    def name(self):
        return self.pod or f"cookie:{self.cookie}"

    def replace_settings(self, settings):
        """A copy with other settings (what a live policy edit tries before it is kept)."""
        return PodRecord(self.cookie, self.netns, settings, self.mode, self.pod, self.container_id,
                         self.ifname, self.addresses, self.enrolled_at, self.journal, self.complete,
                         self.damaged, self.policy_pending)

    def entry(self, piece):
        return next((e for e in self.journal if e.piece == piece), None)

    def netns_exists(self):
        return bool(self.netns) and os.path.exists(self.netns)

    def to_json(self):
        return {
            "cookie": self.cookie, "netns": self.netns, "settings": self.settings.to_dict(),
            "mode": self.mode, "pod": self.pod, "container_id": self.container_id,
            "ifname": self.ifname, "addresses": self.addresses, "enrolled_at": self.enrolled_at,
            "journal": [{"piece": e.piece, "state": e.state} for e in self.journal],
            "complete": self.complete, "policy_pending": self.policy_pending,
        }

    @classmethod
    def from_json(cls, d):
        _check_types(d)
        settings = PodSettings(**d["settings"])
        return cls(
            cookie=int(d["cookie"]), netns=d["netns"], settings=settings,
            mode=d.get("mode") or {"outbound": "ebpf", "inbound": "ebpf"},
            pod=d.get("pod"), container_id=d.get("container_id"), ifname=d.get("ifname"),
            addresses=list(d.get("addresses", [])), enrolled_at=d.get("enrolled_at", 0.0),
            journal=[JournalEntry(e["piece"], e.get("state")) for e in d["journal"]]
            if "journal" in d else _journal_of_0_1(d),
            complete=d.get("complete") is True,
            policy_pending=[str(r) for r in d["policy_pending"]] if isinstance(d.get("policy_pending"), list) else None)


def _journal_of_0_1(d):
    """Records written before the journal (interceptor 0.1) kept each mechanism under
    its own key; read so that an upgraded node can still verify and remove its pods.
    The inbound source (::6 on lo) came later: its entry, without state, only sweeps an
    address of ours (marked), which such a pod never got."""
    journal = [JournalEntry("inbound-source", None)]
    ing = dict(d.get("ingress") or {})
    mechanism = ing.pop("mechanism", None)
    if mechanism:
        journal.append(JournalEntry(f"filter-{mechanism}", ing))
    if d.get("rules"):
        journal.append(JournalEntry("capture-rules", d["rules"]))
    if "ebpf" in (d.get("mode") or {"outbound": "ebpf"}).values():
        journal.append(JournalEntry("capture-bpf", {}))
    return journal


_STR_OR_NONE = (str, type(None))
_TYPES = {"cookie": int, "netns": str, "settings": dict, "mode": (dict, type(None)), "pod": _STR_OR_NONE,
          "container_id": _STR_OR_NONE, "ifname": _STR_OR_NONE, "addresses": list,
          "enrolled_at": (int, float), "journal": list, "complete": bool,
          "policy_pending": (list, type(None))}


def _check_types(d):
    """A record whose fields have other types than write() gives them is damaged: read
    leniently, a string of addresses would silently become none."""
    if not isinstance(d, dict):
        raise ValueError("not an object")
    problem = store.misfit(d, _TYPES)
    if problem:
        raise ValueError(problem)
    if not all(isinstance(a, str) for a in d.get("addresses", [])) or \
            not all(isinstance(e, dict) and isinstance(e.get("piece"), str) for e in d.get("journal", [])):
        raise ValueError("addresses or journal entries of the wrong type")


def write(record):
    store.write_json(paths.pod_state_file(record.cookie), record.to_json(), compact=True)


def read(cookie):
    """The record of this cookie, None if there is none. A file that is not a valid
    record still yields one (damaged, incomplete, settings at their defaults), so the
    pod is reported and can be removed rather than silently forgotten."""
    path = paths.pod_state_file(cookie)
    try:
        raw = store.read_json(path)
    except (OSError, ValueError) as exc:
        return _damaged(cookie, f"unreadable: {exc}")
    if raw is None:         # no file; or one holding JSON null, which is no record either
        return _damaged(cookie, "not a pod record: null") if os.path.lexists(path) else None
    try:
        rec = PodRecord.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError, SettingError) as exc:
        return _damaged(cookie, f"not a pod record: {exc}", raw if isinstance(raw, dict) else {})
    if rec.cookie != cookie:
        return _damaged(cookie, f"records cookie {rec.cookie}", raw)
    return rec


def _damaged(cookie, why, raw=None):
    raw = raw or {}
    netns = raw.get("netns")
    return PodRecord(cookie=cookie, netns=netns if isinstance(netns, str) else "",
                     settings=PodSettings(), mode={"outbound": "unknown", "inbound": "unknown"},
                     damaged=why, complete=False)


def remove(cookie):
    store.remove(paths.pod_state_file(cookie))


def cookies():
    """Cookies that have a record (a listing: nothing is read)."""
    return {int(n[:-5]) for n in paths.listdir(paths.POD_STATE) if n.endswith(".json") and n[:-5].isdigit()}


def cookies_where(match):
    """Cookies of the records whose raw document (a dict) match(doc) accepts. Only the
    JSON is parsed: a DEL on a node of hundreds of pods would otherwise validate every
    record's settings to find one (~0.3 ms each). A record that does not parse matches
    nothing, as it would not by its fields either."""
    found = []
    for cookie in cookies():
        try:
            doc = store.read_json(paths.pod_state_file(cookie))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and match(doc):
            found.append(cookie)
    return found


def all_records():
    """{cookie: PodRecord} of every enrolled pod."""
    out = {}
    for name in paths.listdir(paths.POD_STATE):
        if name.endswith(".json") and name[:-5].isdigit():
            rec = read(int(name[:-5]))
            if rec is not None:
                out[rec.cookie] = rec
    return out
