"""inbound-source: ::6/128 on the pod's lo, the source of the proxy's inbound hop to its
app over IPv6."""
from interceptor import abi
from interceptor.kernel import netns
from interceptor.pod.problems import Kind, Problem
from interceptor.pieces.base import ADDRESS, Piece


class InboundSource(Piece):
    """::6 on lo, so the proxy can bind its inbound hop's source (127.0.0.6 needs nothing:
    127/8 is on lo already). The capture of every mode leaves connections from it alone.
    The address carries our mark (netns.ADDRESS_PROTO) and the journal says whether this
    piece added it, so removal takes away only an address of ours, also in a sweep after
    the record was lost (where the kernel keeps the mark: 5.18+)."""
    name = "inbound-source"
    role = ADDRESS

    def apply(self, target, previous):
        address = abi.INBOUND_SOURCE_V6
        # journalled before the add: a run killed right after it still removes it
        outcome = netns.ensure_lo_address_v6(
            target.record.netns, address,
            before_adding=lambda: target.note(self, {"address": address, "added": True}))
        if outcome is None:         # IPv6 is off in the namespace: no IPv6 inbound hop either
            return {"address": address, "added": False, "ipv6": False}
        # "other" stays ours when an earlier enroll of this pod added it (kernels < 5.18
        # keep no mark)
        ours = outcome in ("added", "ours") or bool((previous or {}).get("added"))
        return {"address": address, "added": ours, "ipv6": True}

    def remove(self, record, state, maps):
        if not record.netns_exists():
            return      # gone with the namespace
        address = (state or {}).get("address", abi.INBOUND_SOURCE_V6)
        try:
            if (state or {}).get("added") or netns.lo_address_v6(record.netns, address) == "ours":
                netns.remove_lo_address_v6(record.netns, address)
        except OSError:
            pass

    def verify(self, record, state, netns_path):
        if not state or not state.get("added") or not record.netns_exists():
            return []
        try:
            if netns.lo_address_v6(record.netns, state["address"]) is not None:
                return []
        except OSError:
            return []
        return [Problem(Kind.INBOUND_SOURCE_MISSING,
                        f"{state['address']} missing from lo (the proxy's inbound source over IPv6)")]
