"""capture-rules: REDIRECT rules (nftables, else iptables) in the pod's namespace, for
the directions eBPF cannot capture on this node, and for what arrives on the pod's
virtual interfaces (a VM's forwarded traffic, which no socket hook sees) in every mode."""
import shutil

from interceptor.pod.problems import Kind, Problem
from interceptor.datapath.plan import RulesBackend
from interceptor.pieces.base import CAPTURE, Piece, PieceError


class CaptureRules(Piece):
    name = "capture-rules"
    role = CAPTURE

    @staticmethod
    def directions(plan, settings):
        from interceptor.kernel.rules import REROUTE
        return plan.rule_directions() + ([REROUTE] if settings.reroute_interfaces else [])

    def check(self, target):
        directions = target.plan.rule_directions()
        if target.record.settings.no_proxy == "passthrough" and directions:
            raise PieceError(f"no_proxy passthrough needs eBPF capture, and {' and '.join(directions)}"
                             f" runs on {target.plan.rules_backend} rules here (REDIRECT always "
                             "redirects)")

    def apply(self, target, previous):
        from interceptor.kernel import rules  # only where a direction runs on rules: ~5 ms of imports
        rec = target.record
        directions = self.directions(target.plan, rec.settings)
        if previous:
            backend = rules.backend_named(previous["backend"])
        elif target.plan.rules_backend == RulesBackend.NFTABLES or \
                (target.plan.rules_backend is None and shutil.which("nft")):
            backend = rules.Nftables()
        else:
            backend = rules.Iptables(rules.detect_iptables_backend(rec.netns))
        out = {"backend": backend.name, "directions": directions}
        # a re-enroll finds our nat tables already there: keep knowing we made them
        known = (previous or {}).get("created") or []
        if isinstance(backend, rules.Iptables):
            # iptables-nft creates nat and raw tables and base chains as it goes: journal
            # what was there before, so a run killed half-way can still tell which were ours
            before = backend.made_chains(rec.netns)
            target.note(self, dict(out, preexisting=sorted(map(list, before)), earlier=known))
            created = backend.apply(rec.netns, rec.settings, directions, before)
        else:
            created = backend.apply(rec.netns, rec.settings, directions) or []
        created = sorted({rules.made_entry(c) for c in known} | {rules.made_entry(c) for c in created})
        return dict(out, created=[list(c) for c in created])

    def remove(self, record, state, maps):
        if not record.netns_exists():
            return      # the rules went with the namespace
        from interceptor.kernel import rules
        if state:
            backend = rules.backend_named(state["backend"])
            created = state.get("created")
            if created is None and "preexisting" in state:    # killed mid-apply
                preexisting = {rules.made_entry(c) for c in state["preexisting"]}
                ours = (backend.made_chains(record.netns) - preexisting) | \
                    {rules.made_entry(c) for c in state.get("earlier", [])}
                created = sorted(map(list, ours))
            backend.remove(record.netns, created)
            return
        # never recorded which backend: remove ours from every backend there is
        backends = ([rules.Nftables()] if shutil.which("nft") else []) + \
            [rules.Iptables(b) for b in rules.iptables_backends()]
        for backend in backends:
            try:
                backend.remove(record.netns)
            except (rules.RulesError, OSError):
                pass

    def verify(self, record, state, netns_path):
        if state is None or not record.netns_exists():
            return []
        from interceptor.kernel import rules
        if not rules.backend_named(state["backend"]).present(record.netns):
            return [Problem(Kind.RULES_MISSING, f"{state['backend']} rules missing")]
        return []

    def counters(self, record, state):
        if state is None or not record.netns_exists():
            return {}
        from interceptor.kernel import rules
        return rules.backend_named(state["backend"]).counters(record.netns)
