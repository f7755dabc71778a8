"""filter-nftables: an nftables netdev ingress chain per interface, the ingress filter of
a node where the kernel runs no BPF filter."""
import os

from interceptor.pod.problems import Kind, Problem
from interceptor.datapath.plan import Ingress
from interceptor.pieces.base import Filter


class FilterNftables(Filter):
    name = "filter-nftables"
    mechanism = Ingress.NFTABLES

    def apply(self, target, previous):
        from interceptor.pieces import ingress_nft
        rec, view = target.record, target.view
        names = [i.name for i in view.interfaces]
        ingress_nft.apply(rec.netns, names, rec.settings.filter_protected_ports(),
                          rec.settings.ingress_policy, view.ephemeral_low)
        skipped = [{"ifname": rec.ifname, "ifindex": 0, "reason": "no such interface"}] \
            if rec.ifname and not names else []
        return {"ephemeral_low": view.ephemeral_low, "skipped": skipped,
                "interfaces": [{"ifname": i.name, "ifindex": i.index, "driver": i.driver,
                                "mode": Ingress.NFTABLES} for i in view.interfaces]}

    def update(self, record, state, maps):
        from interceptor.pieces import ingress_nft
        ingress_nft.apply(record.netns, [a["ifname"] for a in state["interfaces"]],
                          record.settings.filter_protected_ports(),
                          record.settings.ingress_policy, state["ephemeral_low"])
        return state

    def remove(self, record, state, maps):
        if record.netns_exists():
            from interceptor.pieces import ingress_nft
            ingress_nft.remove(record.netns)

    def verify(self, record, state, netns_path):
        from interceptor.pieces import ingress_nft
        path = netns_path or record.netns
        if state is None or not path or not os.path.exists(path):
            return []
        if not ingress_nft.present(path, [a["ifname"] for a in state["interfaces"]]):
            return [Problem(Kind.INGRESS_FILTER_MISSING, "ingress filter (nftables) chain missing")]
        return []

    def counters(self, record, state):
        if not record.netns_exists():
            return {}
        from interceptor.pieces import ingress_nft
        return ingress_nft.counters(record.netns)
