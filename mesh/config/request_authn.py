"""RequestAuthentication: which end-user JWTs a workload validates (Istio's JWTRule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from mesh.config.fields import Node
from mesh.config.resource import Metadata
from mesh.security.jwks import JwksError, parse_jwks
from mesh.security.jwt_verify import JwtKey

#: Istio's default token location: ``Authorization: Bearer <token>``.
DEFAULT_HEADER = ("authorization", "Bearer ")
#: Istio's default JWKS fetch timeout.
DEFAULT_JWKS_TIMEOUT = 5.0


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    #: ``file://``, ``http://`` or ``https://``: fetched in the background, never per call.
    jwks_uri: str | None = None
    #: An inline JWKS (JSON text), checked at load.
    jwks: str | None = None
    #: (header name lower-case, prefix stripped before decoding).
    from_headers: tuple[tuple[str, str], ...] = (DEFAULT_HEADER,)
    #: The header that carries the verified payload (base64url JSON), as Envoy writes it.
    output_payload_to_header: str | None = None
    #: (header, claim): claims copied to headers on a verified token.
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()
    #: False (Istio's default): the token is removed before the call goes on.
    forward_original_token: bool = False
    #: Seconds a JWKS fetch may take.
    timeout: float = DEFAULT_JWKS_TIMEOUT
    #: ``jwks`` parsed once at load.
    inline_keys: tuple[JwtKey, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class RequestAuthentication:
    metadata: Metadata
    selector: tuple[tuple[str, str], ...]
    jwt_rules: tuple[JwtRule, ...]

    @property
    def ref(self) -> str:
        return f"RequestAuthentication/{self.metadata.name}"


def _selector(node: Node) -> tuple[tuple[str, str], ...]:
    if node.value is None:
        return ()
    node.mapping(("matchLabels",))
    return tuple(sorted(node.child("matchLabels").string_map().items()))


def _header_name(node: Node) -> str:
    name = node.string().lower()
    if name.startswith(":") or not name.isascii() or " " in name:
        node.fail(f"is not a header name: {node.value!r}")
    return name


def parse_request_authentication(spec: Node, metadata: Metadata) -> RequestAuthentication:
    spec.mapping(("selector", "jwtRules"), unsupported=("targetRef", "targetRefs"))
    rules = tuple(_rule(item) for item in spec.child("jwtRules").items())
    issuers = [r.issuer for r in rules]
    for i, issuer in enumerate(issuers):
        if issuer in issuers[:i]:
            spec.child("jwtRules").child(i).child("issuer").fail(
                f"issuer {issuer!r} has a rule already (Istio takes one rule per issuer)"
            )
    return RequestAuthentication(metadata, _selector(spec.child("selector")), rules)


def _rule(node: Node) -> JwtRule:
    node.mapping(
        (
            "issuer",
            "audiences",
            "jwksUri",
            "jwks_uri",
            "jwks",
            "fromHeaders",
            "outputPayloadToHeader",
            "outputClaimToHeaders",
            "forwardOriginalToken",
            "timeout",
        ),
        # A gRPC call's path carries no query string and gRPC clients send no cookies:
        # a token there could never be found, so the rule would silently validate nothing.
        unsupported=("fromParams", "fromCookies"),
        required=("issuer",),
    )
    issuer = node.child("issuer").string()
    uri_node = node.child("jwksUri") if node.has("jwksUri") else node.child("jwks_uri")
    uri = uri_node.opt_string()
    jwks = node.child("jwks").opt_string()
    if uri is not None and jwks is not None:
        node.fail("sets both jwksUri and jwks; give one")
    if uri is None and jwks is None:
        # Istio would discover the JWKS with OpenID Connect discovery from the issuer.
        node.fail(
            "needs jwksUri or jwks: OpenID Connect discovery of the JWKS is an Istio "
            "behaviour that meshserve does not support"
        )
    if uri is not None and urlparse(uri).scheme not in ("file", "http", "https"):
        uri_node.fail(f"must be a file://, http:// or https:// URL, got {uri!r}")
    inline: tuple[JwtKey, ...] = ()
    if jwks is not None:
        try:
            inline = parse_jwks(jwks)
        except JwksError as exc:
            node.child("jwks").fail(str(exc))
    headers = []
    for item in node.child("fromHeaders").items():
        item.mapping(("name", "prefix"), required=("name",))
        headers.append((_header_name(item.child("name")), item.child("prefix").opt_string() or ""))
    claims = []
    for item in node.child("outputClaimToHeaders").items():
        item.mapping(("header", "claim"), required=("header", "claim"))
        claims.append((_header_name(item.child("header")), item.child("claim").string()))
    payload = node.child("outputPayloadToHeader")
    return JwtRule(
        issuer=issuer,
        audiences=node.child("audiences").string_list(),
        jwks_uri=uri,
        jwks=jwks,
        from_headers=tuple(headers) or (DEFAULT_HEADER,),
        output_payload_to_header=None if payload.value is None else _header_name(payload),
        output_claim_to_headers=tuple(claims),
        forward_original_token=node.child("forwardOriginalToken").boolean(False),
        timeout=node.child("timeout").duration(DEFAULT_JWKS_TIMEOUT),
        inline_keys=inline,
    )
