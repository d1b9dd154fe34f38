"""JSON Web Key Sets: parsing, and a cache of remote ones refreshed in the background.

A call never waits on a fetch: a rule whose ``jwksUri`` has not been read yet rejects its
tokens (as Istio does while istiod has no key set for it), and a failed refresh keeps the
last good keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import jwt

from mesh.security.jwt_verify import JwtKey

log = logging.getLogger(__name__)

#: Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default: 20 minutes.
REFRESH_SECONDS = 20 * 60.0
#: After a failed fetch, the next try comes sooner.
RETRY_SECONDS = 5.0
#: How often the refresher looks for URIs it has not read yet (a config reload adds them).
POLL_SECONDS = 0.2
#: A JWKS larger than this is refused (a key set is a few kilobytes).
MAX_BYTES = 1 << 20

_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_CURVES = {"P-256": ("ES256",), "P-384": ("ES384",), "P-521": ("ES512",), "Ed25519": ("EdDSA",)}


class JwksError(ValueError):
    """A JWKS that cannot be used, with the reason."""


def _algorithms(data: dict[str, Any]) -> tuple[str, ...]:
    alg = data.get("alg")
    if isinstance(alg, str):
        return (alg,)
    kty = data.get("kty")
    if kty == "RSA":
        return _RSA
    if kty in ("EC", "OKP"):
        return _CURVES.get(str(data.get("crv")), ())
    if kty == "oct":
        return ("HS256", "HS384", "HS512")
    return ()


def parse_jwks(text: str) -> tuple[JwtKey, ...]:
    """The signing keys of a JWKS document (keys marked ``use: enc`` are skipped)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise JwksError(f"JWKS is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise JwksError('JWKS must be a JSON object with a "keys" list')
    keys: list[JwtKey] = []
    for index, data in enumerate(raw["keys"]):
        if not isinstance(data, dict):
            raise JwksError(f"JWKS keys[{index}] is not an object")
        if data.get("use") == "enc":
            continue
        algorithms = _algorithms(data)
        if not algorithms:
            raise JwksError(f"JWKS keys[{index}]: key type {data.get('kty')!r} is not supported")
        try:
            key = jwt.PyJWK(data, algorithms[0]).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            raise JwksError(f"JWKS keys[{index}] is not a usable key: {exc}") from exc
        kid = data.get("kid")
        keys.append(JwtKey(algorithms, key, kid if isinstance(kid, str) else None))
    if not keys:
        raise JwksError("JWKS holds no signing key")
    return tuple(keys)


def read_uri(uri: str, timeout: float) -> str:
    """The text at a ``file://`` or ``http(s)://`` URI (blocking: run off the event loop)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        with open(unquote(parsed.path), "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    else:
        request = urllib.request.Request(uri, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise JwksError(f"JWKS at {uri} is larger than {MAX_BYTES} bytes")
    return data.decode("utf-8")


@dataclass(frozen=True)
class Fetched:
    keys: tuple[JwtKey, ...]
    #: When the keys were read (clock seconds); refreshed REFRESH_SECONDS later.
    at: float


class JwksCache:
    """Remote key sets by URI. :meth:`keys` is what a call reads (a dict lookup);
    :meth:`run` is the background task that reads every wanted URI and refreshes it."""

    def __init__(
        self,
        wanted: Callable[[], Iterable[tuple[str, float]]],
        *,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str, float], str] = read_uri,
        refresh: float = REFRESH_SECONDS,
    ) -> None:
        #: (uri, timeout) of every jwksUri the config in force names.
        self._wanted = wanted
        self._clock = clock
        self._fetch = fetch
        self._refresh = refresh
        self._sets: dict[str, Fetched] = {}
        #: URI → when to try again after a failure.
        self._retry_at: dict[str, float] = {}
        #: URI → why the last fetch failed (for logs and error messages).
        self.errors: dict[str, str] = {}

    def keys(self, uri: str) -> tuple[JwtKey, ...] | None:
        fetched = self._sets.get(uri)
        return None if fetched is None else fetched.keys

    def due(self) -> list[tuple[str, float]]:
        """The URIs to read now: never read, stale, or past their retry time."""
        now = self._clock()
        found = []
        for uri, timeout in dict(self._wanted()).items():
            fetched = self._sets.get(uri)
            retry = self._retry_at.get(uri)
            if retry is not None and now < retry:
                continue
            if fetched is None or now - fetched.at >= self._refresh:
                found.append((uri, timeout))
        return found

    def store(self, uri: str, text: str | None, error: str | None = None) -> None:
        """Records one fetch: keys from ``text``, or ``error`` (the last keys stay)."""
        now = self._clock()
        if text is not None:
            try:
                self._sets[uri] = Fetched(parse_jwks(text), now)
                self._retry_at.pop(uri, None)
                self.errors.pop(uri, None)
                return
            except JwksError as exc:
                error = str(exc)
        self.errors[uri] = error or "unknown error"
        self._retry_at[uri] = now + RETRY_SECONDS
        log.warning("JWKS %s not refreshed (keeping the last keys, if any): %s", uri, error)

    async def refresh_due(self) -> None:
        for uri, timeout in self.due():
            try:
                text = await asyncio.to_thread(self._fetch, uri, timeout)
            except (OSError, ValueError) as exc:
                self.store(uri, None, f"{type(exc).__name__}: {exc}")
                continue
            self.store(uri, text)

    async def run(self, poll: float = POLL_SECONDS) -> None:
        while True:
            await self.refresh_due()
            await asyncio.sleep(poll)
