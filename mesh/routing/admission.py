"""Whether a candidate config may become the running one, judged against what the mesh knows.

:meth:`MeshConfig.build` already refuses a config that is inconsistent in itself (a subset
no DestinationRule defines, a host routed twice). This check adds what only the running mesh
can tell, so that ``meshserve apply`` cannot take a served host down:

- every destination host (route destinations and mirrors) is **known**: it has registered
  instances, or it is **declared** — a DestinationRule in the candidate names it, or it is
  one of the built-in mesh services (``inference``, ``training``, ``data``), or a
  ServiceEntry lists its endpoints (which also count as its instances). A VirtualService
  naming a host in ``hosts`` does not declare it: that only says which calls it routes.
- no host that is **served now** (it has registered instances and every rule of its
  VirtualService reaches at least one of them) is left without a route: under the
  candidate, every rule for it must still have a destination (weight above 0) whose
  host/subset selects at least one registered instance.

A pure function of (candidate, running config, endpoints): the config pipeline calls it
from one place (``mesh.routing.pipeline.merge``) for every way a config arrives, at the
gateway and at every sidecar's outbound. Refusals are ``ConfigError`` (INVALID_ARGUMENT,
as every other config refusal), each naming the resource and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.balance.endpoints import EndpointsSnapshot, select
from mesh.config.fields import ConfigError
from mesh.config.snapshot import MeshConfig
from mesh.config.virtual_service import Destination, HTTPRoute, VirtualService
from mesh.routing.services import PACKAGE_HOSTS

#: Hosts that exist by construction: the mesh's own services (see services.PACKAGE_HOSTS).
BUILTIN_HOSTS = frozenset(PACKAGE_HOSTS.values())


@dataclass(frozen=True)
class DeadRule:
    """A rule of a host's VirtualService none of whose destinations has an instance."""

    vs: VirtualService
    rule: HTTPRoute
    #: Why each destination is empty, e.g. "inference/v9: no instance has labels version=v9".
    reasons: tuple[str, ...]


def _vs_label(vs: VirtualService) -> str:
    md = vs.metadata
    return f"{md.source}: VirtualService {md.namespace}/{md.name}"


def _destination_instances(
    config: MeshConfig, dest: Destination, endpoints: EndpointsSnapshot
) -> tuple[int, str]:
    """How many registered instances ``dest`` selects, and why none when it is 0."""
    registered = endpoints.endpoints(dest.host) + config.entry_endpoints().get(dest.host, ())
    if not registered:
        return 0, f"{dest.describe()}: host {dest.host!r} has no registered instance"
    labels: tuple[tuple[str, str], ...] = ()
    if dest.subset is not None:
        rule = config.destination_rule(dest.host)
        subset = rule.subset(dest.subset) if rule is not None else None
        if subset is None:  # build() refuses this; kept total for a config built otherwise
            return 0, f"{dest.describe()}: subset {dest.subset!r} is not defined"
        labels = subset.labels
    count = len(select(registered, dest.host, dest.subset or "", labels).endpoints)
    if count:
        return count, ""
    wanted = ", ".join(f"{k}={v}" for k, v in labels)
    return 0, f"{dest.describe()}: no instance of {dest.host!r} has labels {wanted}"


def dead_rules(host: str, config: MeshConfig, endpoints: EndpointsSnapshot) -> list[DeadRule]:
    """The rules routing ``host`` under ``config`` that reach no registered instance.

    A host without a VirtualService takes the default route to itself, which reaches its
    instances whenever it has any: no dead rules. A host split over several (one for a
    Gateway, one for ``mesh``) keeps a route only if each of them does, in its own view.
    """
    dead = []
    every = [(vs, rule) for vs in config.virtual_services_for(host) for rule in vs.http]
    for vs, rule in every:
        reasons = []
        for rd in rule.route:
            if rd.weight <= 0:
                reasons.append(f"{rd.destination.describe()}: weight 0")
                continue
            count, reason = _destination_instances(config, rd.destination, endpoints)
            if count:
                break
            reasons.append(reason)
        else:
            dead.append(DeadRule(vs, rule, tuple(reasons)))
    return dead


def _destinations(vs: VirtualService) -> list[tuple[str, Destination]]:
    found = []
    for rule in vs.http:
        for j, rd in enumerate(rule.route):
            found.append((f"spec.http[{rule.index}].route[{j}].destination.host", rd.destination))
        if rule.mirror is not None:
            found.append((f"spec.http[{rule.index}].mirror.host", rule.mirror))
    return found


def admission_problems(
    candidate: MeshConfig, running: MeshConfig, endpoints: EndpointsSnapshot | None
) -> list[str]:
    """Every reason ``candidate`` may not replace ``running``; empty: it may.

    ``endpoints`` is None while discovery has not reported yet (a gateway starting): then
    nothing is served and registrations are unknown, so only declared hosts can be
    confirmed and undeclared ones are let through rather than refused on no evidence.
    """
    problems: list[str] = []
    registered = (
        frozenset(h for h in endpoints.hosts() if endpoints.endpoints(h))
        if endpoints is not None
        else None
    )
    declared = (
        BUILTIN_HOSTS
        | frozenset(candidate.destination_rules)
        | frozenset(candidate.service_entries)
    )
    if registered is not None:
        for vs in candidate.virtual_service_list:
            for path, dest in _destinations(vs):
                if dest.host in declared or dest.host in registered:
                    continue
                problems.append(
                    f"{_vs_label(vs)}: {path}: {dest.host!r} is not a registered service "
                    f"(registered: {', '.join(sorted(registered)) or 'none'}) and no "
                    "DestinationRule declares it (built in: "
                    f"{', '.join(sorted(BUILTIN_HOSTS))})"
                )
    if endpoints is not None and registered is not None:
        for host in sorted(registered):
            if dead_rules(host, running, endpoints):
                continue  # not fully routable now: this change cannot be what breaks it
            for dead in dead_rules(host, candidate, endpoints):
                count = len(endpoints.endpoints(host))
                problems.append(
                    f"{_vs_label(dead.vs)}: spec.http[{dead.rule.index}].route: host "
                    f"{host!r} is served now ({count} registered instance"
                    f"{'s' if count != 1 else ''}) but no destination of "
                    f"{dead.rule.describe()} reaches one ({'; '.join(dead.reasons)})"
                )
    return problems


def check_admission(
    candidate: MeshConfig, running: MeshConfig, endpoints: EndpointsSnapshot | None
) -> None:
    """Raises :class:`ConfigError` naming every problem :func:`admission_problems` finds."""
    problems = admission_problems(candidate, running, endpoints)
    if problems:
        raise ConfigError("; ".join(problems))
