"""Per-call policy, pure and written once: which request headers routing sees (the
hop-by-hop filter), the request id (and its echo in responses), the deadline budget,
``http2MaxRequests`` admission and retry eligibility. The relay (mesh/proxy/exchange.py
and the layers under it) is its one caller today; a sidecar's outbound mode uses the
same functions."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import grpc

from mesh.config.destination_rule import UNLIMITED
from mesh.config.retries import BACKOFF_BASE, BACKOFF_MAX, RetryPolicy
from mesh.routing import headers as md

#: Headers gRPC's transport owns: forwarded as they came (grpc-timeout is rewritten),
#: never routed on nor edited.
TRANSPORT = frozenset(
    {b"content-type", b"te", b"grpc-encoding", b"grpc-accept-encoding", b"user-agent"}
)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def routable(name: bytes) -> bool:
    """Whether a request header is metadata routing sees and header edits touch: not a
    pseudo-header, not the transport's nor gRPC's own, not binary."""
    return not (
        name[:1] == b":" or name in TRANSPORT or name.startswith(b"grpc-") or name.endswith(b"-bin")
    )


#: :func:`routable` by header name: every call asks it of the same ten-odd names.
_ROUTABLE: dict[bytes, bool] = {}


def routing_metadata(
    headers: Sequence[md.RawHeader], request_id: Callable[[], str] | None = None
) -> md.Metadata:
    """The request's routable metadata as text; with ``request_id``, an ``x-request-id``
    made by it is added when the caller sent none (a caller's id is kept)."""
    known = _ROUTABLE
    text = []
    for name, value in headers:
        keep = known.get(name)
        if keep is None:
            keep = routable(name)
            if len(known) < 4096:  # names are the caller's: bounded
                known[name] = keep
        if keep:
            text.append((name.decode("latin-1"), value.decode("latin-1")))
    if request_id is not None and not any(k == md.REQUEST_ID for k, _ in text):
        text.append((md.REQUEST_ID, request_id()))
    return tuple(text)


_REQUEST_ID = md.REQUEST_ID.encode()


def request_id(headers: Sequence[md.RawHeader], make: Callable[[], str]) -> str:
    """A call's id: the caller's ``x-request-id`` when it sent one (kept, as Envoy keeps
    it), else a new one from ``make``."""
    for name, value in headers:
        if name == _REQUEST_ID:
            return value.decode("latin-1")
    return make()


def with_request_id(block: Sequence[md.RawHeader], call_id: str) -> list[md.RawHeader]:
    """A response header block that carries the call's id, so a client in any language can
    find the call in the proxy's logs and spans (Envoy's ``always_set_request_id_in_response``);
    any id the upstream set is replaced by the one the call was given."""
    out = [(n, v) for n, v in block if n != _REQUEST_ID]
    out.append((_REQUEST_ID, call_id.encode("latin-1")))
    return out


def parse_timeout(value: bytes) -> float | None:
    """Seconds in a ``grpc-timeout`` value (at most 8 digits and a unit), or None."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for ``seconds`` (rounded up, in the finest unit that fits)."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60)):
        amount = math.ceil(max(seconds, 0.0) * scale)
        if amount < 100_000_000:
            return str(max(amount, 1)).encode() + unit
    return b"99999999H"


def client_timeout(headers: Sequence[md.RawHeader]) -> float | None:
    """The caller's deadline budget (its ``grpc-timeout``), if it set one."""
    for name, value in headers:
        if name == b"grpc-timeout":
            return parse_timeout(value)
    return None


def call_deadline(begun: float, client: float | None, route: float | None) -> float | None:
    """When the whole call must end: the tighter of the caller's deadline and the route's
    timeout, both counted from the call's first byte; None: neither is set."""
    budgets = [b for b in (client, route) if b is not None]
    return begun + min(budgets) if budgets else None


def attempt_budget(deadline: float | None, now: float, per_try: float | None) -> float | None:
    """Seconds the next attempt may take: what is left of the call, capped by the
    per-try timeout (may be ≤ 0: the call is out of time); None: unbounded."""
    remaining = None if deadline is None else deadline - now
    if per_try is None:
        return remaining
    return per_try if remaining is None else min(per_try, remaining)


def over_request_limit(limit: int, in_flight: int) -> bool:
    """``connectionPool.http.http2MaxRequests``: a destination at its limit sheds the call."""
    return limit < UNLIMITED and in_flight >= limit


def may_retry(
    retries: RetryPolicy,
    *,
    attempt: int,
    idempotent: bool,
    code: grpc.StatusCode,
    connection_failure: bool,
    idempotent_only: bool = False,
) -> bool:
    """Whether a failed attempt (0-based ``attempt``) is tried again: within
    ``retries.attempts`` (on another endpoint while one is left, else on one already
    tried, as Envoy does); a connection failure (the upstream never saw the call) only
    when ``retryOn`` names one (``connect-failure``, ``refused-stream``, ``reset``,
    ``5xx``: a gRPC status token matches an upstream's answer, and there was none); a
    status ``retryOn`` lists for any method, as Envoy retries, or only for an idempotent
    one when the destination asks for that (``idempotent_only``:
    ``meshserve.io/retry-methods: idempotent``, since the upstream may have run the call
    before it failed)."""
    if attempt >= retries.attempts:
        return False
    if connection_failure:
        return retries.retries_connection_failures()
    if idempotent_only and not idempotent:
        return False
    return retries.should_retry(code)


def retry_backoff(retry: int, rng: random.Random) -> float:
    """Seconds to wait before the ``retry``-th retry (1-based): Envoy's fully jittered
    exponential back-off, uniform in [0, (2^retry - 1) · 25 ms), capped at 250 ms."""
    ceiling = min(BACKOFF_BASE * ((1 << min(retry, 16)) - 1), BACKOFF_MAX)
    return rng.random() * ceiling
