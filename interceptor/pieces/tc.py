"""The ingress filter as a tc program: a cls_bpf filter in direct-action mode on the
clsact qdisc of the pod's interface (inside its netns), added over rtnetlink.

On a veth this is the default (bpf/xdp_ingress.c says why). It is a legacy tc filter,
not a tcx link: attaching the first tcx program to a device waits out an RCU grace
period (about 12 ms here, at every pod start), adding a cls_bpf filter does not. So
there is no link to pin: our filter is known by its place and name (TC_PREF, TC_HANDLE,
FILTER_NAME), which is also how a run killed half-way finds it again. The clsact qdisc
is made if the interface has none and removed with our filter only if we made it and
nothing else uses it. Our filter judges first (the lowest preference) and passes with
TC_ACT_UNSPEC, so any other filter on the hook still runs after it.
"""
import collections
import errno
import os
import socket
import struct

from interceptor.kernel import netlink, netns

RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
PARENT_INGRESS, PARENT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
ETH_P_ALL = 0x0003
_TCMSG = struct.Struct("=BxxxiIII")     # family, ifindex, handle, parent, info

TC_PREF = 1                   # judged before any other filter on the hook
TC_HANDLE = 1
FILTER_NAME = "interceptor"   # TCA_BPF_NAME: how our filter is told from others

# A filter on the interface's ingress hook: pref, handle, kind, bpf name and program id.
Filter = collections.namedtuple("Filter", "pref handle kind name prog_id")


def _tcmsg(ifindex, handle, parent, info=0):
    return _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)


def _info(pref):
    return (pref << 16) | socket.htons(ETH_P_ALL)


def filters(ifindex, parent=PARENT_INGRESS):
    """The filters on one hook of the interface (current netns); [] without clsact."""
    out = []
    try:
        for _, body in netlink.dump(socket.NETLINK_ROUTE, RTM_GETTFILTER, _tcmsg(ifindex, 0, parent)):
            _, _, handle, _, info = _TCMSG.unpack_from(body)
            if handle == 0:
                continue        # the classifier itself, listed before its filters
            attrs = netlink.attributes(body, _TCMSG.size)
            kind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode(errors="replace")
            opts = netlink.attributes(attrs.get(TCA_OPTIONS, b""))
            name = opts.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace")
            prog_id = struct.unpack("=I", opts[TCA_BPF_ID])[0] if len(opts.get(TCA_BPF_ID, b"")) == 4 else 0
            out.append(Filter(info >> 16, handle, kind, name, prog_id))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise
    return out


def ours(f):
    return f.pref == TC_PREF and f.kind == "bpf" and f.name == FILTER_NAME


def add_clsact(ifindex):
    """True when we made the qdisc, False when the interface had one."""
    try:
        netlink.request(socket.NETLINK_ROUTE, RTM_NEWQDISC, netlink.NLM_F_CREATE | netlink.NLM_F_EXCL,
                        _tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT) + netlink.attribute(TCA_KIND, b"clsact\0"))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    return True


def delete_clsact(ifindex):
    try:
        netlink.request(socket.NETLINK_ROUTE, RTM_DELQDISC, 0, _tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise


def set_filter(ifindex, prog_fd, pref=TC_PREF, name=FILTER_NAME):
    """Our filter with this program: added, or its program replaced in place (atomic: a
    re-enroll opens no window without a filter). (pref, name: another's, in tests.)"""
    options = netlink.attribute(TCA_BPF_FD, struct.pack("=I", prog_fd)) + \
        netlink.attribute(TCA_BPF_NAME, name.encode() + b"\0") + \
        netlink.attribute(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
    netlink.request(socket.NETLINK_ROUTE, RTM_NEWTFILTER, netlink.NLM_F_CREATE,
                    _tcmsg(ifindex, TC_HANDLE, PARENT_INGRESS, _info(pref)) +
                    netlink.attribute(TCA_KIND, b"bpf\0") + netlink.attribute(TCA_OPTIONS, options))


def delete_filter(ifindex):
    try:
        netlink.request(socket.NETLINK_ROUTE, RTM_DELTFILTER, 0,
                        _tcmsg(ifindex, TC_HANDLE, PARENT_INGRESS, _info(TC_PREF)) +
                        netlink.attribute(TCA_KIND, b"bpf\0"))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise


def unused_clsact(ifindex):
    """The interface's clsact has no filter left on either hook."""
    return not filters(ifindex, PARENT_INGRESS) and not filters(ifindex, PARENT_EGRESS)


def remove_from(netns_path, ifindexes=None, made_qdisc=()):
    """Our filter off each interface (in the namespace at netns_path; every interface
    when ifindexes is None, for a record that cannot say), and the clsact qdiscs we
    made once nothing else uses them. A namespace that is gone took them with it."""
    if not netns_path:
        return
    try:
        entered = netns.entered(netns_path)
        entered.__enter__()
    except OSError:
        return          # gone, or no namespace any more: its interfaces went with it
    try:
        present = {index for index, _ in socket.if_nameindex()}
        for ifindex in (present if ifindexes is None else ifindexes):
            if ifindex not in present:
                continue
            if any(ours(f) for f in filters(ifindex)):
                delete_filter(ifindex)
            if ifindex in made_qdisc and unused_clsact(ifindex):
                delete_clsact(ifindex)
    finally:
        entered.__exit__(None, None, None)


class TcError(Exception):
    pass


def attach(cookie, netns_path, iface, on_conflict, before_qdisc):
    """Our filter, with the pod's stub, on one interface (a netns.Interface). Returns
    {"clsact_ours", "prog_id"}, or None when skipped because another filter holds our
    place. before_qdisc() is called before a clsact qdisc may be made, for the journal:
    a run killed right after must know the qdisc may be ours. Idempotent: a re-enroll
    replaces the program of our filter in place."""
    from interceptor.kernel import libbpf
    from interceptor.datapath import stubs
    prog_fd = stubs.load_for_pod(stubs.TC, cookie)
    try:
        prog_id = libbpf.obj_info(prog_fd, libbpf.ProgInfo).id
        with netns.entered(netns_path):
            foreign = [f for f in filters(iface.index) if f.pref == TC_PREF and not ours(f)]
            if foreign:
                if on_conflict == "skip":
                    return None
                f = foreign[0]
                raise TcError(f"{iface.name} in {netns_path} already has tc filter {f.kind} "
                              f"{f.name or '?'} at preference {TC_PREF}; refusing to replace it "
                              "(set the pod's ingress filter conflict policy to 'skip' to enroll "
                              "without the filter)")
            before_qdisc()
            made = add_clsact(iface.index)
            set_filter(iface.index, prog_fd)
        return {"clsact_ours": made, "prog_id": prog_id}
    finally:
        os.close(prog_fd)


def verify(netns_path, attachment):
    """Problems (messages) with our filter on one recorded interface."""
    try:
        with netns.entered(netns_path):
            found = [f for f in filters(attachment["ifindex"]) if ours(f)]
    except OSError:
        return []          # the namespace is gone: the netns check reports that
    if not found:
        return [f"ingress filter (tc) missing on {attachment['ifname']}"]
    if attachment.get("prog_id") and found[0].prog_id != attachment["prog_id"]:
        return [f"ingress filter (tc) on {attachment['ifname']} runs another program"]
    return []
