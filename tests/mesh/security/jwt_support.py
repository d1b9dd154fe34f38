"""Test issuers: RS256 and ES256 key pairs, their JWKS, and tokens they sign."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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
