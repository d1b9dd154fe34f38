"""First-match-wins selection of a VirtualService rule from a gRPC method path and headers."""

from __future__ import annotations

from collections.abc import Mapping

from mesh.config.virtual_service import HTTPRoute, MatchRequest, StringMatch, VirtualService


def string_matches(match: StringMatch, value: str | None) -> bool:
    """Istio's StringMatch on one value; ``None`` means the header is absent."""
    if value is None:
        return False
    if match.kind == "present":
        return True
    if match.kind == "exact":
        return value == match.value
    if match.kind == "prefix":
        return value.startswith(match.value)
    assert match.pattern is not None  # compiled at load time for every regex
    # Istio (RE2 in Envoy) requires the whole value to match, not a substring.
    return match.pattern.fullmatch(value)


def request_matches(
    match: MatchRequest,
    method: str,
    headers: Mapping[str, str],
    model: str | None = None,
    *,
    port: int | None = None,
) -> bool:
    """Every condition of one ``match`` entry holds (AND within an entry).

    ``model`` is the model the request names (None: it names none, or it could not be
    read); an ``x-meshserve.model`` condition never holds without one. ``port`` is the
    listener port the call arrived on (None: unknown, so a port condition fails)."""
    if match.port is not None and match.port != port:
        return False
    if match.model is not None and not string_matches(match.model, model or None):
        return False
    if match.uri is not None:
        path = method.lower() if match.ignore_uri_case and match.uri.kind != "regex" else method
        if not string_matches(match.uri, path):
            return False
    for name, header in match.headers:
        if not string_matches(header, headers.get(name)):
            return False
    # withoutHeaders: the rule applies only when none of these match.
    return not any(
        string_matches(header, headers.get(name)) for name, header in match.without_headers
    )


def rule_matches(
    rule: HTTPRoute,
    method: str,
    headers: Mapping[str, str],
    model: str | None = None,
    *,
    port: int | None = None,
) -> MatchRequest | None:
    """The first ``match`` entry that holds (OR across entries); a rule without any matches all."""
    if not rule.matches:
        return MatchRequest()
    return next(
        (m for m in rule.matches if request_matches(m, method, headers, model, port=port)), None
    )


def find_rule(
    vs: VirtualService,
    method: str,
    headers: Mapping[str, str],
    model: str | None = None,
    *,
    port: int | None = None,
) -> tuple[HTTPRoute, MatchRequest] | None:
    """The first rule of ``vs`` that matches, and the match entry that made it match."""
    for rule in vs.http:
        matched = rule_matches(rule, method, headers, model, port=port)
        if matched is not None:
            return rule, matched
    return None


Found = tuple[HTTPRoute, MatchRequest] | None
#: find_rule's answers per VirtualService object: the object (kept, so an id reused by a
#: newer one is never mistaken for it), the header names its rules read, the answers.
_memos: dict[int, tuple[VirtualService, tuple[str, ...], dict[tuple[object, ...], Found]]] = {}


def _names_read(vs: VirtualService) -> tuple[str, ...]:
    return tuple(
        sorted(
            {
                name
                for rule in vs.http
                for m in rule.matches
                for name, _ in (*m.headers, *m.without_headers)
            }
        )
    )


def find_rule_memo(
    vs: VirtualService,
    method: str,
    headers: Mapping[str, str],
    model: str | None = None,
    *,
    port: int | None = None,
) -> Found:
    """:func:`find_rule`, remembered. Which rule matches is a pure function of the
    VirtualService and of the method, port, model and the values of the headers its
    rules name, and calls repeat those: the relay asks once per distinct set, not per
    call. A config change brings new VirtualService objects, so old answers never apply."""
    entry = _memos.get(id(vs))
    if entry is None or entry[0] is not vs:
        if len(_memos) >= 64:
            _memos.clear()
        entry = _memos[id(vs)] = (vs, _names_read(vs), {})
    _, names, memo = entry
    key = (method, port, model, *[headers.get(name) for name in names])
    try:
        return memo[key]
    except KeyError:
        pass
    found = find_rule(vs, method, headers, model, port=port)
    if len(memo) >= 4096:  # the values are the callers': bounded
        memo.clear()
    memo[key] = found
    return found


def describe_match(match: MatchRequest) -> str:
    parts = [f"gateways {', '.join(match.gateways)}"] if match.gateways else []
    if match.port is not None:
        parts.append(f"port {match.port}")
    if match.model is not None:
        parts.append(f"model {match.model.describe()}")
    if match.uri is not None:
        parts.append(f"uri {match.uri.describe()}")
    parts += [f"header {name} {m.describe()}" for name, m in match.headers]
    parts += [f"without header {name} {m.describe()}" for name, m in match.without_headers]
    label = f"match {match.name!r}: " if match.name else ""
    return label + (" and ".join(parts) if parts else "any request")
