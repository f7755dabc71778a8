"""filter-xdp: the BPF ingress filter, the pod's stub on each interface (tc or XDP) and
its entries in xdp_pods, ingress_sources, ingress_rules and port_rules (kind PROTECTED)."""
from interceptor.pod.problems import Kind, Problem
from interceptor.datapath import pod_entries, stubs
from interceptor.datapath.plan import Hook, Ingress
from interceptor.pieces import tc, xdp
from interceptor.pieces.base import Filter, PieceError


class FilterXdp(Filter):
    """The BPF ingress filter: the pod's stub on each interface, on the tc hook (the
    default on a veth) or XDP. (Named for XDP, its first hook: the name is in every pod
    record's journal.)"""
    name = "filter-xdp"
    mechanism = Ingress.BPF
    uses_maps = True

    def apply(self, target, previous):
        rec, view, maps = target.record, target.view, target.maps
        s = rec.settings
        pod_entries.write_filter(maps, rec.cookie, s, view.ephemeral_low)
        out = {"ephemeral_low": view.ephemeral_low, "interfaces": [], "skipped": []}
        if rec.ifname and not view.interfaces:
            out["skipped"].append({"ifname": rec.ifname, "ifindex": 0, "reason": "no such interface"})
        had_clsact = {a["ifindex"] for a in (previous or {}).get("interfaces", []) if a.get("clsact_ours")}
        for iface in view.interfaces:
            entry = {"ifname": iface.name, "ifindex": iface.index, "driver": iface.driver}
            try:
                if xdp.hook_for(s.ingress_filter, iface.driver, target.plan.bpf_filter_hooks) == Hook.TC:
                    # journalled before a qdisc may be made: what is on so far, this
                    # interface (its clsact possibly ours), and what an earlier enroll put
                    # on the interfaces not yet reached
                    done_so_far = out["interfaces"] + [dict(entry, mode="tc", clsact_ours=True)]
                    reached = {a["ifindex"] for a in done_so_far}
                    journal = dict(out, interfaces=done_so_far + [
                        a for a in (previous or {}).get("interfaces", []) if a["ifindex"] not in reached])
                    done = tc.attach(rec.cookie, rec.netns, iface, s.ingress_conflict,
                                     lambda: target.note(self, journal))
                    if done is not None:
                        done["clsact_ours"] = done["clsact_ours"] or iface.index in had_clsact
                        mode = "tc"
                        entry.update(done)
                    else:
                        mode = None
                else:
                    mode = xdp.attach(rec.cookie, rec.netns, iface, s.ingress_filter, s.ingress_conflict)
            except (xdp.XdpError, tc.TcError, stubs.StubError, OSError) as exc:
                raise PieceError(str(exc)) from None
            if mode is None:
                out["skipped"].append({"ifname": iface.name, "ifindex": iface.index,
                                       "reason": "another program holds the filter's place"})
            else:
                out["interfaces"].append(dict(entry, mode=mode))
        self._off_the_other_hook(rec, previous, out)
        return out

    @staticmethod
    def _off_the_other_hook(rec, previous, out):
        """A re-enroll that moved an interface between tc and XDP: the old hook's filter
        comes off once the new one is on (no moment without a filter)."""
        now = {a["ifindex"]: a["mode"] for a in out["interfaces"]}
        for a in (previous or {}).get("interfaces", []):
            ifindex = a["ifindex"]
            if ifindex not in now or (a["mode"] == "tc") == (now[ifindex] == "tc"):
                continue
            if a["mode"] == "tc":
                tc.remove_from(rec.netns, [ifindex], {ifindex} if a.get("clsact_ours") else set())
            else:
                xdp.detach(rec.cookie, ifindex)

    def update(self, record, state, maps):
        pod_entries.write_filter(maps, record.cookie, record.settings, state["ephemeral_low"])
        return state

    def remove(self, record, state, maps):
        xdp.detach_all(record.cookie)
        if state is None:
            # begun and never recorded, or a damaged record: our filter is found by its
            # place and name on every interface (a clsact we might have made was always
            # journalled first, so none can be ours here)
            tc.remove_from(record.netns)
        else:
            on_tc = [a for a in state.get("interfaces", []) if a.get("mode") == "tc"]
            if on_tc:
                tc.remove_from(record.netns, [a["ifindex"] for a in on_tc],
                               {a["ifindex"] for a in on_tc if a.get("clsact_ours")})
        if maps is not None:
            pod_entries.remove_filter(maps, record.cookie)

    def verify(self, record, state, netns_path):
        if state is None:
            return []
        netns_path = netns_path or record.netns
        attachments = state.get("interfaces", [])
        problems = xdp.verify(record.cookie, netns_path, [a for a in attachments if a.get("mode") != "tc"])
        for a in attachments:
            if a.get("mode") == "tc":
                problems += [Problem(Kind.INGRESS_FILTER_MISSING, msg) for msg in tc.verify(netns_path, a)]
        return problems
