"""What every piece is (the interface pieces/__init__ describes) and what a piece's
calls receive."""
from interceptor.datapath.plan import Ingress

FILTER, CAPTURE, ADDRESS = "filter", "capture", "address"       # a piece's role


class PieceError(Exception):
    """The pod cannot be served as asked (a message for the operator)."""


class Target:
    """What apply and check work from: the record being written, the one look into the
    pod's namespace (netns.PodNetns), the node's plan, the opened maps (None when no
    piece of the pod uses them), and note(piece, state) to journal what removal needs
    mid-apply. (Plain classes on this path: `dataclasses` costs ~14 ms of imports.)"""
    __slots__ = ("record", "view", "plan", "maps", "note")

    def __init__(self, record, view, plan, maps, note=None):
        self.record, self.view, self.plan, self.maps, self.note = record, view, plan, maps, note


class Piece:
    name = None
    role = None
    uses_maps = False           # needs the pinned maps open (under the node lock)

    def check(self, target):
        pass

    def apply(self, target, previous):
        raise NotImplementedError

    def update(self, record, state, maps):
        return state

    def remove(self, record, state, maps):
        raise NotImplementedError

    def verify(self, record, state, netns_path):
        return []

    def counters(self, record, state):
        return {}


class Filter(Piece):
    """What the two ingress filters share: their journal state's shape."""
    role = FILTER
    mechanism = None

    @staticmethod
    def describe(state):
        """{interfaces: [{ifname, ifindex, driver, mode}], skipped: [{ifname, reason}]}."""
        state = state or {}
        return state.get("interfaces", []), state.get("skipped", [])


def filter_label(mechanism, attachment):
    """How status and the demo name one interface's filter: 'tc eth0', 'xdp
    eth0:native', 'nftables eth0'."""
    if attachment["mode"] == "tc":
        return f"tc {attachment['ifname']}"
    if mechanism == Ingress.BPF:
        return f"xdp {attachment['ifname']}:{attachment['mode']}"
    return f"{mechanism} {attachment['ifname']}"
