"""The relay's sidecar-inbound mode: who the caller is, whether it may call, where it goes.

A sidecar's relay terminates mutual TLS, so each client connection carries a verified
identity (:class:`Caller`). Every new stream is then admitted by :meth:`Inbound.admit`:
PeerAuthentication and AuthorizationPolicy (the sidecar injects them as one check, the
same policy code its gRPC servers use), then the concurrency limit; the worker receives
the call unchanged but for ``x-meshserve-peer``, which carries the verified SPIFFE id and
is never taken from the caller, and, for a worker on a TCP port, the unit's secret
(``x-meshserve-sidecar-secret``, see :mod:`mesh.server.sidecar_secret`), never taken from
the caller either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from mesh.balance.endpoints import Endpoint
from mesh.balance.preload import PRELOAD_HEADER
from mesh.errors import ResourceExhausted
from mesh.proxy.hpack_codec import Header
from mesh.routing import headers as md
from mesh.security.authz import RequestAttributes
from mesh.security.peer import PeerInfo, peer_from_ssl
from mesh.security.request_authn import JwtIdentity
from mesh.server.sidecar_secret import HEADER as SECRET_HEADER

#: The verified SPIFFE id of the caller, for the worker (Istio's XFCC, reduced to the URI).
PEER_HEADER = md.PEER
_PEER = PEER_HEADER.encode()
#: Headers only the sidecar sets: a caller's copies are dropped, never forwarded.
#: The preload list is the sidecar's own word to its worker (mesh/balance/preload.py): a
#: caller's would make a joining worker load what the caller chose.
_SET_HERE = frozenset({_PEER, SECRET_HEADER.encode(), PRELOAD_HEADER.encode()})
#: Paths the sidecar's own gRPC server answers (its health mirrors the worker's).
#: Reflection goes to the worker, like any call: a client of the mesh port (grpcurl with
#: a mesh certificate) lists and describes the services the sidecar fronts, not the
#: sidecar's own (which it could not call through this port anyway).
OWN_SERVICES = ("/grpc.health.v1.Health/",)
#: Admits a call from a caller (its TLS identity) with these attributes, or raises a
#: MeshError naming why not (PeerAuthentication, then AuthorizationPolicy).
Check = Callable[[PeerInfo, RequestAttributes], None]


def edit_headers(
    headers: list[Header], remove: Collection[str], add: Iterable[tuple[str, str]]
) -> list[Header]:
    """``headers`` without the names in ``remove`` (lower-case), then ``add`` appended:
    RequestAuthentication's edits (a token not forwarded, the verified payload)."""
    gone = {name.encode() for name in remove}
    out = [(n, v) for n, v in headers if n.lower() not in gone]
    out.extend((name.encode(), value.encode("latin-1", "replace")) for name, value in add)
    return out


class TextHeaders(Mapping[str, str]):
    """A call's text metadata as AuthorizationPolicy sees it (keys lower-case, no pseudo or
    binary headers, a repeated name's values joined by ","), decoded on first read: only a policy condition on
    ``request.headers[...]`` reads it, and without one the sidecar's relay would build
    and throw away a dict of every header on every call."""

    __slots__ = ("_headers", "_text")

    def __init__(self, headers: Sequence[Header]) -> None:
        self._headers = headers
        self._text: dict[str, str] | None = None

    def _decoded(self) -> dict[str, str]:
        text = self._text
        if text is None:
            text = self._text = md.text_headers(self._headers)
        return text

    def __getitem__(self, key: str) -> str:
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())


class ConcurrencyLimit:
    """At most ``limit`` calls at once (None: unlimited); refuses rather than queues.

    Refusing at once is Envoy's circuit-breaker behaviour: the caller (the gateway) retries
    on another endpoint instead of waiting behind a saturated worker.
    """

    def __init__(self, limit: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self._clock = clock
        # The time integral of in_flight since the last ``average()``: in-flight calls x seconds.
        self._area = 0.0
        self._since = self._changed = clock()

    def _account(self) -> float:
        now = self._clock()
        self._area += self.in_flight * (now - self._changed)
        self._changed = now
        return now

    def try_acquire(self) -> bool:
        if self.limit is not None and self.in_flight >= self.limit:
            return False
        self._account()
        self.in_flight += 1
        return True

    def release(self) -> None:
        self._account()
        self.in_flight -= 1

    def average(self) -> float:
        """Calls in flight on average (time-weighted) since the previous call; starts over.

        What the autoscaler needs, as Knative's queue-proxy reports it: a reading once a
        second of the count at that instant may fall between calls and see none.
        """
        now = self._account()
        span = now - self._since
        mean = self._area / span if span > 0 else float(self.in_flight)
        self._area, self._since = 0.0, now
        return mean


@dataclass(frozen=True)
class Caller:
    """What one client connection proved: its TLS identity, and its address."""

    peer: PeerInfo = field(default_factory=PeerInfo)
    ip: str | None = None
    #: The peer's principal and namespace, read once per connection, not per call.
    principal: str | None = field(init=False, default=None)
    namespace: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        identity = self.peer.identity
        object.__setattr__(self, "principal", self.peer.principal)
        object.__setattr__(self, "namespace", None if identity is None else identity.namespace)

    @classmethod
    def of(cls, transport: asyncio.BaseTransport) -> Caller:
        peername = transport.get_extra_info("peername")
        ip = peername[0] if isinstance(peername, tuple) and peername else None
        return cls(peer_from_ssl(transport.get_extra_info("ssl_object")), ip)


ANONYMOUS = Caller()


class Inbound:
    """The sidecar-inbound mode of a :class:`mesh.proxy.relay.Relay` (see module doc)."""

    def __init__(
        self,
        app_address: str,
        check: Check,
        limit: ConcurrencyLimit,
        *,
        app_secret: str | None = None,
    ) -> None:
        #: The worker: ``host:port`` or ``unix:PATH``.
        self.endpoint = Endpoint(app_address)
        self.check = check
        self.limit = limit
        #: Added to every call: a worker on a TCP port serves only calls carrying it.
        self._secret: tuple[Header, ...] = (
            ((SECRET_HEADER.encode(), app_secret.encode()),) if app_secret is not None else ()
        )

    def admit(
        self,
        path: str,
        headers: list[Header],
        caller: Caller,
        identity: JwtIdentity | None = None,
    ) -> list[Header] | None:
        """The request headers for the worker, with the caller's identity; None: a call for
        the sidecar's own gRPC server. ``identity``: the end-user JWT RequestAuthentication
        verified (the relay checked it already). Raises a MeshError when the call is
        refused; an admitted worker call holds a place under the limit (the caller
        releases it)."""
        authority = None
        for name, value in headers:
            if name == b":authority":
                authority = value.decode("latin-1")
                break
        peer = caller.peer
        self.check(
            peer,
            RequestAttributes(
                path=path,
                principal=caller.principal,
                source_namespace=caller.namespace,
                source_ip=caller.ip,
                host=authority,
                headers=TextHeaders(headers),
                request_principal=None if identity is None else identity.principal,
                request_claims={} if identity is None else identity.claims,
            ),
        )
        if path.startswith(OWN_SERVICES):
            return None
        if not self.limit.try_acquire():
            raise ResourceExhausted(
                f"the sidecar's concurrency limit of {self.limit.limit} calls is reached"
            )
        # A caller's own x-meshserve-peer would be a forged identity, and its own secret
        # header at best a guess: both are always replaced.
        out = [(n, v) for n, v in headers if n.lower() not in _SET_HERE]
        if peer.spiffe_id is not None:
            out.append((_PEER, peer.spiffe_id.encode()))
        out.extend(self._secret)
        return out
