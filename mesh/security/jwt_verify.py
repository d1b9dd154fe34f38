"""JWT signature and claim verification, written once for the gateway's edge credential and
for RequestAuthentication (gateway and sidecars)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from mesh.errors import Unauthenticated

#: Algorithms accepted in a token's header (never ``none``).
JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
)


@dataclass(frozen=True)
class JwtKey:
    """One verification key and the algorithms it may verify."""

    algorithms: tuple[str, ...]
    #: An HMAC secret (bytes), a PEM public key (text), or a key object (from a JWKS).
    key: Any
    kid: str | None = None

    @property
    def algorithm(self) -> str:
        return self.algorithms[0]


@dataclass(frozen=True)
class JwtCheck:
    """What a valid token must satisfy besides its signature."""

    #: The ``iss`` the token must carry; None: any.
    issuer: str | None = None
    #: ``aud`` must hold one of these; empty: not checked.
    audiences: tuple[str, ...] = ()
    leeway_seconds: float = 0.0
    #: Claims that must be present (the gateway's edge credential requires ``exp``).
    require: tuple[str, ...] = ()
    #: Refuse a token whose ``iat`` is in the future (Envoy's jwt_authn never does).
    verify_iat: bool = True


def describe_error(exc: jwt.PyJWTError, check: JwtCheck) -> str:
    """The client's message for a token that failed (no secrets, the claim that failed)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "JWT has expired (exp is in the past)"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "JWT is not valid yet (nbf/iat is in the future)"
    if isinstance(exc, jwt.InvalidAudienceError):
        return f"JWT audience is not accepted (expected one of: {', '.join(check.audiences)})"
    if isinstance(exc, jwt.InvalidIssuerError):
        return f"JWT issuer is not accepted (expected {check.issuer})"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"JWT lacks the required claim {exc.claim!r}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "JWT signature does not verify"
    if isinstance(exc, jwt.DecodeError):
        return f"JWT is malformed: {exc}"
    return f"JWT is not valid: {exc}"


def unverified_header(token: str, check: JwtCheck) -> Mapping[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated(describe_error(exc, check)) from exc


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token claims, read before verification only to choose its rule."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


def verify(token: str, keys: Sequence[JwtKey], check: JwtCheck) -> dict[str, Any]:
    """The token's claims once its signature verifies with one of ``keys`` and its claims
    pass ``check``; raises :class:`Unauthenticated` naming what failed."""
    header = unverified_header(token, check)
    alg, kid = header.get("alg"), header.get("kid")
    # Keys are chosen by the token's algorithm, so an HS256 token can never be checked
    # against an RSA public key used as an HMAC secret (algorithm confusion).
    chosen = [
        k
        for k in keys
        if alg in k.algorithms and alg in JWT_ALGORITHMS and (kid is None or k.kid in (None, kid))
    ]
    if not chosen:
        accepted = ", ".join(sorted({a for k in keys for a in k.algorithms})) or "none"
        raise Unauthenticated(
            f"JWT algorithm {alg!r}{f' with kid {kid!r}' if kid else ''} is not accepted "
            f"(configured: {accepted})"
        )
    error: jwt.PyJWTError | None = None
    for key in chosen:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[str(alg)],
                audience=list(check.audiences) or None,
                issuer=check.issuer,
                leeway=dt.timedelta(seconds=check.leeway_seconds),
                options={
                    "require": list(check.require),
                    "verify_aud": bool(check.audiences),
                    "verify_iat": check.verify_iat,
                },
            )
        except jwt.InvalidSignatureError as exc:
            error = exc  # another key of the same algorithm may verify it
            continue
        except jwt.PyJWTError as exc:
            raise Unauthenticated(describe_error(exc, check)) from exc
        return claims
    assert error is not None
    raise Unauthenticated(describe_error(error, check))
