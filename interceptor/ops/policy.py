"""`interceptor policy`: change an enrolled pod's ingress policy while it runs. The pod's
filter piece writes the new rule set to the maps (or the nftables chain) as a
difference, and the pod's record keeps it, so a re-enroll or CNI CHECK sees the live
policy."""
from interceptor import store
from interceptor.pod import ingress_policy, podrecord
from interceptor.datapath.maps import Maps
from interceptor import pieces
from interceptor.ops import enrollment


class PolicyCommandError(Exception):
    pass


def find_pod(netns_path=None, pod=None, cookie=None):
    """The PodRecord of exactly one enrolled pod."""
    records = podrecord.all_records()
    matches = [c for c in enrollment.matching_cookies(netns_path, cookie, pod) if c in records]
    if not matches:
        raise PolicyCommandError("no such enrolled pod")
    if len(matches) > 1:
        raise PolicyCommandError(f"{len(matches)} enrolled namespaces match; give --cookie")
    return records[matches[0]]


def change(selector, add=(), remove=(), replace=None):
    """Add and/or remove rules (texts), or replace the whole list. Returns the new list.
    Removing a rule that is not there is an error (a typo must not look like success)."""
    with store.node_lock():
        rec = find_pod(**selector)
        current = rec.settings.ingress_policy
        try:
            if replace is not None:
                new = ingress_policy.parse_rules(list(replace))
            else:
                new = list(current)
                for text in remove:
                    rule = ingress_policy.parse_rule(text)
                    if rule not in new:
                        raise PolicyCommandError(f"no rule '{ingress_policy.rule_text(rule)}'")
                    new.remove(rule)
                for text in add:
                    rule = ingress_policy.parse_rule(text)
                    if rule not in new:
                        new.append(rule)
            settings = rec.settings.replace(ingress_policy=new)
        except ValueError as exc:
            raise PolicyCommandError(str(exc)) from None
        if new == current and rec.policy_pending is None:
            return new          # (after an interrupted edit the maps may differ: rewrite them)
        piece, applied = pieces.filter_of(rec)
        if piece is None:
            raise PolicyCommandError("this pod has no ingress filter")
        if applied is None:
            raise PolicyCommandError("the pod's enrollment is incomplete: enroll it again first")
        rec.policy_pending = [ingress_policy.rule_text(r) for r in new]
        podrecord.write(rec)        # journalled: an edit killed from here on is known
        try:
            _update(piece, rec.replace_settings(settings), applied)
        except (OSError, pieces.PieceError) as exc:    # a full map; the datapath unloaded
            # the filter writes new entries before it removes stale ones: writing the
            # old policy again only overwrites, then drops what the failed edit added
            try:
                _update(piece, rec, applied)
                rec.policy_pending = None
            except (OSError, pieces.PieceError):
                pass
            podrecord.write(rec)
            raise PolicyCommandError(f"cannot apply the policy: {exc}; the previous one stays") from None
        rec.settings = settings
        rec.policy_pending = None
        podrecord.write(rec)
        return new


def _update(piece, rec, applied):
    if piece.uses_maps:
        with Maps() as maps:
            piece.update(rec, applied, maps)
    else:
        piece.update(rec, applied, None)


def listing(selector=None):
    """[{pod, cookie, mechanism, protected_ports, rules}] of one pod or all."""
    if selector and any(v is not None for v in selector.values()):
        records = [find_pod(**selector)]
    else:
        records = [rec for _, rec in sorted(podrecord.all_records().items())]
    out = []
    for rec in records:
        piece, _ = pieces.filter_of(rec)
        out.append({
            "pod": rec.pod, "cookie": rec.cookie, "netns": rec.netns,
            "mechanism": piece.mechanism if piece else None,
            "protected_ports": rec.settings.filter_protected_ports(),
            "allow_only": ingress_policy.allow_only(rec.settings.ingress_policy),
            "rules": [ingress_policy.rule_text(r) for r in rec.settings.ingress_policy],
        })
    return out
