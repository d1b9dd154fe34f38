"""Test issuers: RS256 and ES256 key pairs, their JWKS, and tokens they sign."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@dataclass
class Issuer:
    iss: str
    alg: str
    private: Any
    kid: str

    @classmethod
    def rsa(cls, iss: str, kid: str = "rsa-1") -> Issuer:
        return cls(
            iss, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048), kid
        )

    @classmethod
    def ec(cls, iss: str, kid: str = "ec-1") -> Issuer:
        return cls(iss, "ES256", ec.generate_private_key(ec.SECP256R1()), kid)

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        data: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        data["kid"] = self.kid
        return data

    def jwks(self) -> str:
        return json.dumps({"keys": [self.jwk()]})

    def token(self, sub: str = "alice", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.iss, "sub": sub, "iat": now, "exp": now + 600, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


@contextmanager
def serve_jwks(body: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server answering ``body['jwks']`` (read per request, so a test can
    rotate keys); yields its URL and the paths it was asked for."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            data = body["jwks"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
