"""Enroll a pod's network namespace into the loaded datapath, and remove it.

This path runs for every pod start (CNI ADD), so it never imports BCC or compiles: it
opens the pinned maps and programs through libbpf. A pod is served by the pieces the
plan names (interceptor/pieces/), applied in order as a journal kept in the pod's
record (interceptor/pod/podrecord.py): the record is written before the first piece and
after each one, so a run killed anywhere leaves a record that says what may be in
place, and removal undoes the journal in reverse.
"""
import contextlib
import ipaddress
import os

from interceptor import paths, store
from interceptor.kernel import libbpf, netns
from interceptor.pod import podrecord
from interceptor.pod.podrecord import JournalEntry, PodRecord
from interceptor.pod.podspec import PodSettings
from interceptor.pod.problems import Kind, Problem
from interceptor.datapath import node_state, pod_entries
from interceptor.datapath.maps import LayoutError, Maps
from interceptor import pieces
from interceptor.ops import opstats


class EnrollError(Exception):
    pass


class NotLoadedError(EnrollError):
    pass


def enroll(netns_path, settings, pod=None, addresses=None, container_id=None, ifname=None):
    """Enroll (or re-enroll with new settings) the namespace at netns_path. Returns the
    PodRecord. addresses: the pod's IPs when the caller knows them (CNI prevResult);
    read from the namespace otherwise."""
    try:
        record = _enroll(netns_path, settings, pod, addresses, container_id, ifname)
    except BaseException:
        opstats.record("enroll", ok=False)
        raise
    opstats.record("enroll", ok=True)
    return record


def _enroll(netns_path, settings, pod, addresses, container_id, ifname):
    node = node_state.read_node()[0]           # the one read of the node state an ADD makes
    plan = node.plan if node and node.complete else None
    if plan is None:
        raise NotLoadedError("the datapath is not loaded (run `interceptor load`)")
    if settings.interception_mode == "NONE":
        raise EnrollError("interception mode NONE: nothing of this pod is to be captured "
                          "(the CNI plugin leaves such a pod alone)")
    try:
        wanted = pieces.for_pod(plan, settings)
    except pieces.PieceError as exc:
        raise EnrollError(str(exc)) from None
    view = _look(netns_path, ifname, wanted)
    # the cookie load compiled into the programs (a rules-only load recorded none)
    if view.cookie == (node.host_netns_cookie or netns.host_cookie()):
        raise EnrollError("refusing to enroll the host network namespace")
    found = view.addresses if addresses is None else {ipaddress.ip_address(a) for a in addresses}
    record = PodRecord(
        cookie=view.cookie, netns=str(netns_path), settings=settings, pod=pod,
        container_id=container_id, ifname=ifname,
        addresses=[str(a) for a in sorted(set(found), key=lambda a: (a.version, a))],
        mode={"outbound": plan.outbound.value, "inbound": plan.inbound.value})
    with store.node_lock():
        old = podrecord.read(record.cookie)
        if old is not None and not old.complete:
            # killed half-way, or damaged: what it left is unknown, so clear it first,
            # and look again (what was looked at included what this removed)
            remove_pod(record.cookie)
            old = None
            view = _look(netns_path, ifname, wanted)
            if view.cookie != record.cookie:
                raise EnrollError(f"{netns_path} is another network namespace now")
        stale = [e for e in old.journal if pieces.BY_NAME.get(e.piece) not in wanted] if old else []
        using_maps = any(p.uses_maps for p in wanted) or \
            any(getattr(pieces.BY_NAME.get(e.piece), "uses_maps", False) for e in stale)
        with (_open_maps() if using_maps else contextlib.nullcontext()) as maps:
            _journal(record, wanted, stale, old, pieces.Target(record, view, plan, maps))
        record.complete = True
        podrecord.write(record)
    return record


def _journal(record, wanted, stale, old, target):
    """Apply the wanted pieces in order, then remove the stale ones (pieces the new
    settings turn off), journalling each step in the record."""
    try:
        for piece in wanted:
            piece.check(target)     # before anything is written: nothing to undo
    except pieces.PieceError as exc:
        raise EnrollError(str(exc)) from None
    previous = {e.piece: e.state for e in old.journal} if old else {}
    # a re-enroll journals what is in place until each piece records anew: a run killed
    # in between must still know, say, which nat tables were ours
    record.journal = [JournalEntry(p.name, previous.get(p.name)) for p in wanted] + stale

    def note(piece, applied_so_far):
        record.entry(piece.name).state = applied_so_far
        podrecord.write(record)
    target.note = note
    podrecord.write(record)
    try:
        for i, piece in enumerate(wanted):
            record.journal[i].state = piece.apply(target, previous.get(piece.name))
            if i < len(wanted) - 1:
                podrecord.write(record)
        for entry in reversed(stale):
            pieces.BY_NAME[entry.piece].remove(record, entry.state, target.maps)
            record.journal.remove(entry)
    except pieces.PieceError as exc:
        remove_pod(record.cookie)
        raise EnrollError(str(exc)) from None
    except Exception:
        remove_pod(record.cookie)
        raise


def _look(netns_path, ifname, wanted):
    try:
        return netns.look(netns_path, ifname, xdp=pieces.BY_NAME[pieces.FilterXdp.name] in wanted)
    except OSError as exc:
        raise EnrollError(f"cannot open network namespace {netns_path}: {exc.strerror}") from exc


def _open_maps():
    """Every map, each checked against the layout this code writes, opened under the
    node lock (an unload cannot unpin them in between) and before anything is written:
    a datapath of another version is refused with nothing to undo."""
    try:
        return Maps().open_all()
    except OSError as exc:
        raise NotLoadedError("the datapath is not loaded (run `interceptor load`)") from exc
    except LayoutError as exc:
        raise NotLoadedError(str(exc)) from None


def _maps_for_removal(unloading):
    """The maps, or None where there are none to edit. Maps of another version's layout
    cannot be edited: a DEL is refused (LayoutError; the runtime retries once the
    upgrade is done), while unload, which unpins the maps themselves, goes on without."""
    try:
        return Maps().open_all()
    except OSError:
        return None
    except LayoutError:
        if unloading:
            return None
        raise


def remove_pod(cookie, unloading=False):
    """Everything of one netns: its journal undone in reverse (capture off first), then
    what the datapath made for it, leftover pins and the record. Safe when parts are
    already gone, and for a pod with no record or a damaged one (every piece sweeps).
    The caller holds the lock."""
    rec = podrecord.read(cookie)
    if rec is None or rec.damaged:
        stub = PodRecord(cookie=cookie, netns=rec.netns if rec else "", settings=PodSettings(), mode={})
        journal = [JournalEntry(name) for name in pieces.sweep_journal()]
        rec = stub
    else:
        journal = rec.journal
        if rec.complete:
            # marked first: a removal killed half-way (say, a link detached but still
            # pinned) leaves an incomplete record, which status reports and the next
            # enroll clears before it applies anything, instead of a "complete" one
            # that a re-enroll would trust and keep
            rec.complete = False
            podrecord.write(rec)
    maps = _maps_for_removal(unloading)
    try:
        for entry in reversed(journal):
            piece = pieces.BY_NAME.get(entry.piece)
            if piece is not None:
                piece.remove(rec, entry.state, maps)
        if maps is not None:
            pod_entries.forget(maps, cookie)
        _detach_pins(paths.pod_pin_dir(cookie))
    finally:
        if maps is not None:
            maps.close()
    podrecord.remove(cookie)


def _detach_pins(pin_dir):
    if not os.path.isdir(pin_dir):
        return
    for name in paths.listdir(pin_dir):
        libbpf.detach_link_pin(os.path.join(pin_dir, name))
    os.rmdir(pin_dir)


def matching_cookies(netns_path=None, cookie=None, pod=None):
    """Cookies of our enrollments matching any of netns path, cookie or pod name (a
    namespace that is gone still matches its recorded path)."""
    cookies = set()
    if cookie is not None:
        cookies.add(int(cookie))
    if netns_path is not None:
        try:
            cookies.add(netns.cookie_of(netns_path))
        except OSError:
            pass    # namespace gone: match by the recorded path instead
    if netns_path is not None or pod is not None:
        cookies |= set(podrecord.cookies_where(
            lambda doc: (netns_path is not None and doc.get("netns") == str(netns_path)) or
                        (pod is not None and doc.get("pod") == pod)))
    # only what is ours: a namespace that is not enrolled does not match
    return sorted(cookies & (podrecord.cookies() | paths.pinned_pod_cookies()))


def unenroll(netns_path=None, cookie=None, pod=None):
    """Remove one pod, found by netns path, cookie or pod name. Returns the cookies
    removed (empty when nothing matched: unenroll is idempotent)."""
    with store.node_lock():
        cookies = matching_cookies(netns_path, cookie, pod)
        for c in cookies:
            remove_pod(c)
            opstats.record("unenroll", ok=True)
        return cookies


def _container_cookies(container_id, ifname):
    return podrecord.cookies_where(lambda doc: doc.get("container_id") == container_id and
                                   (not ifname or doc.get("ifname") in (None, ifname)))


def find_container(container_id, ifname=None):
    for cookie in _container_cookies(container_id, ifname):
        rec = podrecord.read(cookie)
        if rec is not None:
            return rec
    return None


def unenroll_container(container_id, ifname=None):
    """CNI DEL: everything recorded for this container. Idempotent, and works when the
    namespace is already gone (the record has the cookie)."""
    with store.node_lock():
        cookies = _container_cookies(container_id, ifname)
        for c in cookies:
            remove_pod(c)
            opstats.record("unenroll", ok=True)
        return cookies


def verify(rec, netns_path=None):
    """Problems with one enrollment (CNI CHECK, status), most fundamental first: CHECK
    answers with the first one's code. The pieces are asked in reverse journal order,
    capture (is the pod captured at all?) before its filter."""
    problems = []
    if rec.damaged:
        problems.append(Problem(Kind.INCOMPLETE, f"record {rec.damaged}: run DEL/unenroll, "
                                "then ADD/enroll again"))
    elif not rec.complete:
        problems.append(Problem(Kind.INCOMPLETE, "enrollment incomplete (interrupted, or still "
                                "in progress): run ADD/enroll again, or DEL/unenroll"))
    if rec.policy_pending is not None:
        problems.append(Problem(Kind.POLICY_INTERRUPTED, "a live policy edit was interrupted: the "
                                "filter may hold parts of two policies (`interceptor policy set` "
                                "with the rules wanted settles it; `policy list` shows the recorded ones)"))
    if netns_path:
        try:
            if netns.cookie_of(netns_path) != rec.cookie:
                problems.append(Problem(Kind.NETNS_MISMATCH,
                                        f"network namespace {netns_path} is not the enrolled one"))
        except OSError:
            problems.append(Problem(Kind.NETNS_MISMATCH,
                                    f"network namespace {netns_path} cannot be opened"))
    for entry in reversed(rec.journal):
        piece = pieces.BY_NAME.get(entry.piece)
        if piece is None:
            problems.append(Problem(Kind.INCOMPLETE, f"unknown datapath piece {entry.piece!r} "
                                    "(recorded by another version)"))
            continue
        problems += piece.verify(rec, entry.state, netns_path)
    return problems


def counters(rec):
    """The pod's counters kept outside the stats map (rules, the nftables filter)."""
    out = {}
    for entry in rec.journal:
        piece = pieces.BY_NAME.get(entry.piece)
        if piece is not None:
            out.update(piece.counters(rec, entry.state))
    return out


def garbage_collect(keep):
    """CNI GC: remove CNI enrollments whose (container ID, ifname) is not in keep, and
    kernel objects no record accounts for. Enrollments made by the CLI are kept."""
    removed = []
    with store.node_lock():
        records = podrecord.all_records()
        for cookie, rec in records.items():
            cid = rec.container_id
            if cid and (cid, rec.ifname) not in keep and (cid, None) not in keep:
                remove_pod(cookie)
                removed.append(cookie)
        orphans = set()
        orphans |= paths.pinned_pod_cookies()
        try:
            with Maps() as maps:
                orphans |= {k.value for k in maps.pods.keys()}
                orphans |= {k.value for k in maps.xdp_pods.keys()}
        except OSError:
            pass
        for cookie in orphans - set(records):
            remove_pod(cookie)
            removed.append(cookie)
    return removed
