"""Connection settings for the Elasticsearch discovery store and a connect-with-backoff helper."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

from elasticsearch import AsyncElasticsearch, ConnectionTimeout
from elasticsearch import TransportError as _TransportError
from elasticsearch.exceptions import ApiError

from mesh.errors import FailedPrecondition, InvalidArgument, MeshError, Unavailable
from registry.store_url import store_url, url_problem

log = logging.getLogger(__name__)

#: Environment variable naming the cluster; unset means the local embedded store.
ES_URL_ENV = "MESHSERVE_ES_URL"
#: Default index prefix: several meshes share one cluster by picking different prefixes.
DEFAULT_PREFIX = "meshserve"

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class StoreSettings:
    """How to reach Elasticsearch and which indices belong to this mesh.

    Secrets (``password``, ``api_key``) are kept out of ``repr`` so settings can be logged.
    """

    url: str
    prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)
    ca_certs: str | None = None
    verify_certs: bool = True
    request_timeout: float = 10.0

    def __post_init__(self) -> None:
        problem = url_problem(self.url)
        if problem is not None:
            raise InvalidArgument(problem)
        # Index names must be lowercase and cannot start with '-', '_' or '+'.
        if (
            not self.prefix
            or self.prefix != self.prefix.lower()
            or self.prefix[0] in "-_+"
            or any(c in self.prefix for c in ' "*\\<|,>/?#:')
        ):
            raise InvalidArgument(
                f"index prefix {self.prefix!r} must be a lowercase Elasticsearch index name"
            )
        if self.password is not None and self.username is None:
            raise InvalidArgument("an Elasticsearch password needs a username")
        if self.request_timeout <= 0:
            raise InvalidArgument(f"request_timeout must be positive, got {self.request_timeout}")

    @property
    def display_url(self) -> str:
        """The URL without any user:password part, safe for messages and logs."""
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def client(self) -> AsyncElasticsearch:
        """A new async client; the caller closes it (``await client.close()``)."""
        options: dict[str, Any] = {}
        if self.username is not None:
            options["basic_auth"] = (self.username, self.password or "")
        if self.api_key is not None:
            options["api_key"] = self.api_key
        if self.ca_certs is not None:
            options["ca_certs"] = self.ca_certs
        return AsyncElasticsearch(
            self.url,
            verify_certs=self.verify_certs,
            **options,
            request_timeout=self.request_timeout,
            # Retries belong to our own backoff loops, which know about last known good.
            max_retries=0,
            retry_on_timeout=False,
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        /,
        *,
        url: str | None = None,
        prefix: str | None = None,
        username: str | None = None,
        api_key: str | None = None,
        ca_certs: str | None = None,
        verify_certs: bool | None = None,
    ) -> StoreSettings:
        """Settings from ``MESHSERVE_ES_*`` variables; arguments that are not None win."""
        env = os.environ if env is None else env
        chosen_url = url or env.get(ES_URL_ENV, "")
        if not chosen_url:
            raise InvalidArgument(f"no Elasticsearch URL: set {ES_URL_ENV} or pass --es")
        verify_env = env.get("MESHSERVE_ES_VERIFY_CERTS", "true").lower()
        return cls(
            url=chosen_url,
            prefix=prefix or env.get("MESHSERVE_ES_PREFIX", DEFAULT_PREFIX),
            username=username or env.get("MESHSERVE_ES_USERNAME"),
            password=env.get("MESHSERVE_ES_PASSWORD"),
            api_key=api_key or env.get("MESHSERVE_ES_API_KEY"),
            ca_certs=ca_certs or env.get("MESHSERVE_ES_CA_CERTS"),
            verify_certs=(
                verify_certs if verify_certs is not None else verify_env not in ("0", "false", "no")
            ),
        )

    def with_prefix(self, prefix: str) -> StoreSettings:
        return replace(self, prefix=prefix)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command that talks to the store accepts."""
    group = parser.add_argument_group("discovery store")
    group.add_argument(
        "--es",
        type=store_url,
        metavar="URL",
        help=f"Elasticsearch URL (default: ${ES_URL_ENV}, else the local store of `meshserve up`)",
    )
    group.add_argument(
        "--prefix", help=f"index prefix, to share one cluster (default: {DEFAULT_PREFIX})"
    )
    group.add_argument("--es-username", help="basic auth user")
    group.add_argument("--es-api-key", help="API key (base64 id:key)")
    group.add_argument("--es-ca-certs", metavar="PEM", help="CA bundle for https")
    group.add_argument(
        "--es-insecure", action="store_true", help="do not verify the server certificate"
    )


def settings_from_args(args: argparse.Namespace, url: str) -> StoreSettings:
    """Settings from parsed flags (see ``add_store_arguments``) over the environment."""
    return StoreSettings.from_env(
        url=url,
        prefix=args.prefix,
        username=args.es_username,
        api_key=args.es_api_key,
        ca_certs=args.es_ca_certs,
        verify_certs=False if args.es_insecure else None,
    )


def backoff_delays(
    initial: float = 0.1, factor: float = 2.0, maximum: float = 5.0
) -> Iterator[float]:
    """Endless exponential delays, capped: 0.1, 0.2, 0.4, ... 5, 5, ..."""
    delay = initial
    while True:
        yield min(delay, maximum)
        delay *= factor


def did_not_answer(settings: StoreSettings, deadline_s: float) -> Unavailable:
    """The one error for a store that took a connection but no answer came in time."""
    return Unavailable(
        f"the store at {settings.display_url} did not answer within {deadline_s:g} s"
    )


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a request that ran out of time (a slow or frozen store)."""
    return isinstance(exc, ConnectionTimeout | TimeoutError)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the store could not be reached (as opposed to a refused request)."""
    if isinstance(exc, _TransportError | OSError | asyncio.TimeoutError):
        return True
    # 5xx from a proxy or an overloaded cluster is just as transient.
    return isinstance(exc, ApiError) and exc.status_code >= 500


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def unreachable_as_unavailable(
    what: str, *, deadline_s: float | None = None
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
]:
    """Decorates a store-backed async method: a store that cannot be reached (restarting, a
    network cut) or, with ``deadline_s``, does not answer in time (frozen) raises
    ``Unavailable`` naming ``what``. Callers tell a transient outage from a bug, and gRPC
    callers get UNAVAILABLE (which they retry or wait out) instead of INTERNAL, or their
    own deadline running out with no word on why."""

    def decorate(
        method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                async with asyncio.timeout(deadline_s):
                    return await method(self, *args, **kwargs)
            except MeshError:
                raise
            except Exception as exc:
                if deadline_s is not None and is_timeout(exc):
                    raise Unavailable(f"{what} did not answer within {deadline_s:g} s") from exc
                if not is_unreachable(exc):
                    raise
                raise Unavailable(f"{what} is unreachable: {type(exc).__name__}") from exc

        return guarded

    return decorate


async def connect(
    settings: StoreSettings,
    *,
    deadline_s: float = 30.0,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
) -> AsyncElasticsearch:
    """A client that has answered once, retrying with backoff until ``deadline_s``.

    Raises ``Unavailable`` naming the URL when the store never answers. No attempt outlives
    the deadline: a frozen store (it accepts connections but never answers) would otherwise
    hold the first one for the whole ``request_timeout``.
    """
    client = settings.client()
    try:
        return await _first_answer(client, settings, deadline_s, sleep, clock)
    except BaseException:
        # Also when cancelled (a caller's own deadline): no session is left open.
        await client.close()
        raise


async def _first_answer(
    client: AsyncElasticsearch,
    settings: StoreSettings,
    deadline_s: float,
    sleep: Sleep,
    clock: Clock,
) -> AsyncElasticsearch:
    start = clock()
    attempts = 0
    delays = backoff_delays()
    while True:
        attempts += 1
        try:
            left = deadline_s - (clock() - start)
            if left <= 0:
                raise TimeoutError
            await client.options(request_timeout=min(settings.request_timeout, left)).info()
            return client
        except Exception as exc:
            if not is_unreachable(exc):
                # Wrong credentials or a forbidden cluster: retrying cannot help.
                raise FailedPrecondition(
                    f"Elasticsearch at {settings.display_url} rejected the client: {exc}"
                ) from exc
            delay = next(delays)
            if clock() - start + delay > deadline_s:
                if is_timeout(exc):
                    raise did_not_answer(settings, deadline_s) from exc
                raise Unavailable(
                    f"Elasticsearch at {settings.display_url} is unreachable "
                    f"({attempts} attempts in {clock() - start:.1f}s): {exc}"
                ) from exc
            log.warning(
                "Elasticsearch at %s unreachable (%s); retrying in %.1fs",
                settings.display_url,
                type(exc).__name__,
                delay,
            )
            await sleep(delay)
