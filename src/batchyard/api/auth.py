"""Bearer-key authentication. A key is either a static `--api-key` (each its own owner, derived from the key's hash)
or a key stored in the metadata store (`batchyard keys create`; its owner is its project's id, so every key of a
project sees the project's objects). Keys are never logged or stored in clear.

`resolve` runs before every route (an app-level dependency: stored keys need the store) and leaves its finding on
the request; `owner` and `principal` read it, and raise the 401 when the route needs a key. Requests need a key when
any static key is configured or any key was ever stored; otherwise every request is the anonymous owner, as before.

What `resolve` read of a stored key is trusted for `cache_seconds` (5 s by default): a key revoked or a project
archived through the admin API of this process stops working at once; through the CLI or another API replica, within
that time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastapi import Request

from batchyard.domain import tenancy
from batchyard.domain.tenancy import KeyHolder
from batchyard.errors import APIError, StoreError, Unauthorized
from batchyard.store.base import MetadataStore

ANONYMOUS = "default"
CACHE_ENTRIES = 10_000  # lookups remembered at most (misses too: a client trying keys costs the store little)
_STATE = "batchyard_principal"


def owner_of(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the owner of what it makes and sees, and whether it may use the admin API."""

    owner: str
    admin: bool = False
    project_id: str | None = None  # a stored key's project (None for a static key or anonymous)


def _missing() -> Unauthorized:
    return Unauthorized(
        "You didn't provide an API key. Provide it in an Authorization header: Bearer YOUR_KEY.",
        code="missing_api_key",
    )


def _incorrect() -> Unauthorized:
    return Unauthorized("Incorrect API key provided.", code="invalid_api_key")


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    def __init__(
        self,
        keys: Iterable[str],
        *,
        store: MetadataStore | None = None,
        admin_keys: Iterable[str] = (),
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        admins = list(dict.fromkeys(admin_keys))
        static = list(dict.fromkeys([*keys, *admins]))
        self._keys = [(k.encode(), Principal(owner_of(k), admin=k in admins)) for k in static]
        self._store = store
        self._ttl = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, KeyHolder | None]] = {}
        self._store_has_keys = False  # once true, always (keys are revoked, never deleted)
        self._checked_until = 0.0

    @property
    def enabled(self) -> bool:
        """Whether static keys are configured (stored keys may require a key too: see `resolve`)."""
        return bool(self._keys)

    def forget(self, key_hash: str | None = None) -> None:
        """Drop what was read of one stored key (or of all): the next request reads the store again."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    def _static(self, token: str) -> Principal | None:
        given = token.encode()
        found = None
        for key, principal in self._keys:
            if hmac.compare_digest(key, given):
                found = principal
        return found

    async def _holder(self, digest: str) -> KeyHolder | None:
        assert self._store is not None
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        holder = await self._store.key_holder(digest)
        if holder is not None and not hmac.compare_digest(holder.key.key_hash, digest):
            holder = None
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, holder)
        return holder

    async def _keys_stored(self) -> bool:
        if self._store is None or self._store_has_keys:
            return self._store_has_keys
        now = self._clock()
        if now >= self._checked_until:
            self._store_has_keys = await self._store.has_api_keys()
            self._checked_until = now + self._ttl
        return self._store_has_keys

    async def _find(self, request: Request) -> Principal | APIError:
        token = _bearer(request)
        if token is not None:
            static = self._static(token)
            if static is not None:
                return static
            if self._store is not None and tenancy.looks_like_key(token):
                holder = await self._holder(tenancy.key_hash(token))
                if holder is not None and holder.active:
                    return Principal(holder.project.id, admin=holder.key.admin, project_id=holder.project.id)
        if not self._keys and not await self._keys_stored():
            return Principal(ANONYMOUS)
        return _incorrect() if token is not None else _missing()

    async def resolve(self, request: Request) -> None:
        """Find who the request is (a dependency of every route); `principal` answers it."""
        found: Principal | APIError | StoreError
        try:
            found = await self._find(request)
        except StoreError as e:  # raised by the routes that need a key (503); /health still answers
            found = e
        request.scope.setdefault("state", {})[_STATE] = found

    def principal(self, request: Request) -> Principal:
        found = request.scope.get("state", {}).get(_STATE)
        if found is None:  # `resolve` did not run (a request built by hand): static keys only
            found = self._find_static(request)
        if isinstance(found, APIError | StoreError):
            raise found
        assert isinstance(found, Principal)
        return found

    def _find_static(self, request: Request) -> Principal | APIError:
        if not self._keys:
            return Principal(ANONYMOUS)
        token = _bearer(request)
        if token is None:
            return _missing()
        return self._static(token) or _incorrect()

    def owner(self, request: Request) -> str:
        return self.principal(request).owner
