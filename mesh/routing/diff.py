"""What changes in routing between two configs: hosts, rules, destinations, weights, subsets.

A pure function of the two configs (``meshserve apply --dry-run`` prints its result); the
words are built from the small result, not inline with the comparison (convention 13).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mesh.config.destination_rule import DestinationRule
from mesh.config.gateway import Gateway
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.snapshot import MeshConfig
from mesh.config.virtual_service import HTTPRoute, VirtualService
from mesh.routing.match import describe_match

ChangeKind = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class RouteChange:
    """One difference: ``subject`` (what), and how it reads before and after ("" if absent)."""

    kind: ChangeKind
    subject: str
    before: str = ""
    after: str = ""


@dataclass(frozen=True)
class RoutingDiff:
    changes: tuple[RouteChange, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)


def describe_rule(rule: HTTPRoute) -> str:
    """A rule as one line: which calls it takes and where they go, with weights."""
    matches = " or ".join(describe_match(m) for m in rule.matches) or "any request"
    targets = ", ".join(f"{d.destination.describe()} {d.weight}%" for d in rule.route)
    text = f"{matches} → {targets}"
    if rule.mirror is not None:
        text += f"; mirror to {rule.mirror.describe()} {rule.mirror_percentage:g}%"
    return text


def _policy(rule: HTTPRoute) -> HTTPRoute:
    """The rule without what :func:`describe_rule` shows (what is left is its policy)."""
    return dataclasses.replace(rule, name="", matches=(), route=(), mirror=None)


def _rule_subject(host: str, rule: HTTPRoute) -> str:
    return f"{host} {rule.describe()}"


def _compare_hosts(host: str, old: MeshConfig, new: MeshConfig) -> list[RouteChange]:
    """A host's rules: compared as one VirtualService each side, or, where either side
    splits the host over several (one per view, or merged at a Gateway), VirtualService
    by VirtualService (matched by namespace and name), each named in the subject."""
    before, after = old.virtual_services_for(host), new.virtual_services_for(host)
    if len(before) <= 1 and len(after) <= 1:
        return _compare_rules(host, next(iter(before), None), next(iter(after), None))
    olds = {(v.metadata.namespace, v.metadata.name): v for v in before}
    news = {(v.metadata.namespace, v.metadata.name): v for v in after}
    changes: list[RouteChange] = []
    for key in sorted(olds.keys() | news.keys()):
        vs = news.get(key) or olds[key]
        label = f"{host} {vs.ref}"
        if key[0] != DEFAULT_NAMESPACE:
            label += f" (namespace {key[0]})"
        changes += _compare_rules(label, olds.get(key), news.get(key), absent="none")
    return changes


def _compare_rules(
    host: str, old: VirtualService | None, new: VirtualService | None, absent: str = ""
) -> list[RouteChange]:
    """``host`` is what subjects name; ``absent`` what no VirtualService means there
    (by default, the default route to the host)."""
    changes: list[RouteChange] = []
    absent = absent or f"default route to {host}"
    old_rules = old.http if old is not None else ()
    new_rules = new.http if new is not None else ()
    if old is None and new is not None:
        changes.append(RouteChange("added", f"host {host}", absent, new.ref))
    elif old is not None and new is None:
        changes.append(RouteChange("removed", f"host {host}", old.ref, absent))
    elif old is not None and new is not None and old.gateways != new.gateways:
        changes.append(
            RouteChange(
                "changed", f"host {host} gateways", _bound(old.gateways), _bound(new.gateways)
            )
        )
    for i in range(max(len(old_rules), len(new_rules))):
        before = old_rules[i] if i < len(old_rules) else None
        after = new_rules[i] if i < len(new_rules) else None
        if before is None and after is not None:
            changes.append(
                RouteChange("added", _rule_subject(host, after), "", describe_rule(after))
            )
        elif after is None and before is not None:
            changes.append(
                RouteChange("removed", _rule_subject(host, before), describe_rule(before), "")
            )
        elif before is not None and after is not None and before != after:
            old_text, new_text = describe_rule(before), describe_rule(after)
            if _policy(before) != _policy(after):
                # A timeout, retry, fault or header edit: not in the one-line description.
                new_text += "; and its timeout, retries, fault or header edits changed"
            elif old_text == new_text and before.route != after.route:
                # A rename alone is said by the subject; only destinations hide more.
                new_text += "; its destinations' header edits changed"
            subject = _rule_subject(host, after)
            if before.name != after.name:
                subject = f"{host} http[{i}] ({before.name or '-'} → {after.name or '-'})"
            changes.append(RouteChange("changed", subject, old_text, new_text))
    return changes


def _bound(gateways: tuple[str, ...]) -> str:
    return ", ".join(gateways) or "unset (mesh)"


def _compare_gateways(old: MeshConfig, new: MeshConfig) -> list[RouteChange]:
    changes: list[RouteChange] = []
    for name in sorted(old.gateways.keys() | new.gateways.keys()):
        before, after = old.gateways.get(name), new.gateways.get(name)
        if before is None and after is not None:
            changes.append(RouteChange("added", f"Gateway {name}", "", _servers(after)))
        elif after is None and before is not None:
            changes.append(RouteChange("removed", f"Gateway {name}", _servers(before), ""))
        elif before is not None and after is not None and before != after:
            old_text, new_text = _servers(before), _servers(after)
            if old_text == new_text:
                new_text += " (its selector changed)"
            changes.append(RouteChange("changed", f"Gateway {name}", old_text, new_text))
    return changes


def _servers(gateway: Gateway) -> str:
    return "; ".join(
        f"port {s.port} hosts {', '.join(h.describe() for h in s.hosts)}" for s in gateway.servers
    )


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels) or "all instances"


def _compare_subsets(
    host: str, old: DestinationRule | None, new: DestinationRule | None
) -> list[RouteChange]:
    changes: list[RouteChange] = []
    old_subsets = {s.name: s for s in old.subsets} if old is not None else {}
    new_subsets = {s.name: s for s in new.subsets} if new is not None else {}
    for name in sorted(old_subsets.keys() | new_subsets.keys()):
        subject = f"{host}/{name}"
        before, after = old_subsets.get(name), new_subsets.get(name)
        if before is None and after is not None:
            changes.append(RouteChange("added", f"subset {subject}", "", _labels(after.labels)))
        elif after is None and before is not None:
            changes.append(RouteChange("removed", f"subset {subject}", _labels(before.labels), ""))
        elif before is not None and after is not None and before != after:
            new_text = _labels(after.labels)
            if before.labels == after.labels:
                new_text += " (its traffic policy changed)"
            changes.append(
                RouteChange("changed", f"subset {subject}", _labels(before.labels), new_text)
            )
    if (
        old is not None
        and new is not None
        and (old.traffic_policy, old.extensions) != (new.traffic_policy, new.extensions)
    ):
        changes.append(
            RouteChange(
                "changed",
                f"traffic policy of {host}",
                f"{old.ref} as running",
                "changed (load balancer, outlier detection or connection pool)",
            )
        )
    return changes


def routing_diff(old: MeshConfig, new: MeshConfig) -> RoutingDiff:
    """Every routing difference from ``old`` to ``new``, host by host, in a stable order."""
    changes: list[RouteChange] = []
    hosts = (
        set(old.virtual_services)
        | set(new.virtual_services)
        | set(old.destination_rules)
        | set(new.destination_rules)
    )
    changes += _compare_gateways(old, new)
    for host in sorted(hosts):
        changes += _compare_hosts(host, old, new)
        changes += _compare_subsets(host, old.destination_rule(host), new.destination_rule(host))
    return RoutingDiff(tuple(changes))


_MARKS: dict[ChangeKind, str] = {"added": "+", "removed": "-", "changed": "~"}


def diff_lines(diff: RoutingDiff) -> list[str]:
    """The diff as text, one change per line (two for a change: before, then after)."""
    if not diff:
        return ["no routing change"]
    lines = []
    for change in diff.changes:
        mark = _MARKS[change.kind]
        if change.kind == "changed":
            lines.append(f"{mark} {change.subject}: {change.before}")
            lines.append(f"  {' ' * len(change.subject)}→ {change.after}")
        else:
            lines.append(f"{mark} {change.subject}: {change.after or change.before}")
    return lines
