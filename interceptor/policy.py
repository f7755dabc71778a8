"""`interceptor policy`: change an enrolled pod's ingress policy while it runs. The new
rule set is written to the maps (or the nftables chain) as a difference and recorded in
the pod's record, so a re-enroll or CNI CHECK sees the live policy."""
from . import enrollment, ingress, ingress_policy, paths, state
from .podspec import PodSettings


class PolicyCommandError(Exception):
    pass


def find_pod(netns_path=None, pod=None, cookie=None):
    """(cookie, record) of exactly one enrolled pod."""
    records = state.pod_records()
    matches = [c for c in enrollment.matching_cookies(netns_path, cookie, pod) if c in records]
    if not matches:
        raise PolicyCommandError("no such enrolled pod")
    if len(matches) > 1:
        raise PolicyCommandError(f"{len(matches)} enrolled namespaces match; give --cookie")
    return matches[0], records[matches[0]]


def change(selector, add=(), remove=(), replace=None):
    """Add and/or remove rules (texts), or replace the whole list. Returns the new list.
    Removing a rule that is not there is an error (a typo must not look like success)."""
    with state.node_lock():
        cookie, rec = find_pod(**selector)
        settings = PodSettings(**rec["settings"])
        current = settings.ingress_policy
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
            settings = settings.replace(ingress_policy=new)
        except ValueError as exc:
            raise PolicyCommandError(str(exc)) from None
        if new == current:
            return new
        try:
            ingress.update_policy(rec, settings)
        except ingress.IngressError as exc:
            raise PolicyCommandError(str(exc)) from None
        except OSError as exc:    # e.g. the datapath was unloaded under the record
            raise PolicyCommandError(f"cannot apply the policy: {exc}") from None
        rec["settings"] = settings.to_dict()
        state.write_json(paths.pod_state_file(cookie), rec)
        return new


def listing(selector=None):
    """[{pod, cookie, mechanism, protected_ports, rules}] of one pod or all."""
    if selector and any(v is not None for v in selector.values()):
        items = [find_pod(**selector)]
    else:
        items = sorted(state.pod_records().items())
    out = []
    for cookie, rec in items:
        settings = PodSettings(**rec["settings"])
        out.append({
            "pod": rec.get("pod"), "cookie": cookie, "netns": rec.get("netns"),
            "mechanism": (rec.get("ingress") or {}).get("mechanism"),
            "protected_ports": ingress.protected_ports(settings),
            "allow_only": ingress_policy.allow_only(settings.ingress_policy),
            "rules": [ingress_policy.rule_text(r) for r in settings.ingress_policy],
        })
    return out
