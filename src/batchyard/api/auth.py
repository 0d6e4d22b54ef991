"""Bearer-key authentication. Each configured key is its own owner; keys are never logged or stored in clear."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from batchyard.errors import Unauthorized

ANONYMOUS = "default"


def owner_of(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [(k.encode(), owner_of(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def owner(self, request: Request) -> str:
        if not self._keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "You didn't provide an API key. Provide it in an Authorization header: Bearer YOUR_KEY.",
                code="missing_api_key",
            )
        given = token.strip().encode()
        for key, owner in self._keys:
            if hmac.compare_digest(key, given):
                return owner
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
