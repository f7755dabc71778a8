"""What can be wrong with an enrollment, each kind named once.

`enrollment.verify` returns Problems; `status` shows their messages and exits 1, and CNI
CHECK answers with the first one's kind as its error code (the spec leaves codes from
100 up to plugins). A new kind of problem is added here, with its code, so it can never
fall through to "ok" the way a sentence matched by substring could.
"""
from interceptor.abi import Codes


class Kind(Codes):
    """The CNI CHECK error code of each kind of problem."""
    NOT_ENROLLED = 100            # CHECK only: no record for the container
    POD_ENTRY_MISSING = 101       # the pods map entry that switches capture on
    INBOUND_LINK_MISSING = 102    # the pod's sk_lookup link: missing or detached
    NETNS_MISMATCH = 103          # the runtime's netns is not the one enrolled
    RULES_MISSING = 104           # REDIRECT rules of the fallback path
    INGRESS_FILTER_MISSING = 105  # XDP link or nftables chain of the ingress filter
    INCOMPLETE = 106              # recorded, never finished (an ADD killed half-way)
    POLICY_INTERRUPTED = 107      # a live policy edit killed half-way: the filter may mix two
    INBOUND_SOURCE_MISSING = 108  # ::6 on the pod's lo, which enroll added, is gone


class Problem:
    """One finding: its kind and a short sentence for people."""
    __slots__ = ("kind", "message")

    def __init__(self, kind, message):
        self.kind, self.message = kind, message

    def __str__(self):
        return self.message

    def __repr__(self):
        return f"Problem({Kind.name_of(self.kind)}, {self.message!r})"

    def __eq__(self, other):
        return isinstance(other, Problem) and (self.kind, self.message) == (other.kind, other.message)
