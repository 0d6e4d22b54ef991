"""The `Idempotency-Key` header of the create routes (`POST /v1/files`, `/v1/uploads`, `/v1/batches`).

A route names the object it is about to create and calls `Idempotency.claim` with a fingerprint of its parameters:
the store's unique (owner, key) decides which of racing requests creates it (insert-first). The others wait for that
object and answer it (200, `Idempotent-Replayed: true`); a key used with other parameters answers 409
`idempotency_key_reused` (Stripe's words: OpenAI documents no idempotency keys). A request that fails after claiming
gives the key back (`guard`), so a retry can create the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from batchyard.api.deps import shown
from batchyard.domain import idempotency as rule
from batchyard.domain.idempotency import IdempotencyKey, Outcome
from batchyard.errors import Conflict, InvalidRequest
from batchyard.store.base import MetadataStore

HEADER = "Idempotency-Key"
REPLAYED = {"Idempotent-Replayed": "true"}
WAIT_S = 10.0  # how long a request waits for the object of the request that holds its key
POLL_S = 0.05


def key_of(request: Request) -> str | None:
    """The request's idempotency key (None without the header); 400 for one that is empty, too long or not
    printable ASCII."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not key or len(key) > rule.MAX_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(
            f"Invalid '{HEADER}' header: expected 1 to {rule.MAX_KEY_CHARS} printable ASCII characters.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return key


def _reused(key: str) -> Conflict:
    return Conflict(
        "Keys for idempotent requests can only be used with the same parameters they were first used with. "
        f"Try using a key other than '{shown(key)}' if you meant to execute a different request.",
        param=HEADER,
        code="idempotency_key_reused",
    )


def _in_use(key: str) -> Conflict:
    return Conflict(
        "There is currently another in-progress request using this Idempotent Key (that probably means you "
        f"submitted twice, and the other request is still going through): {shown(key)}. Please try again later.",
        param=HEADER,
        code="idempotency_key_in_use",
    )


class Idempotency:
    def __init__(self, store: MetadataStore, *, wait_s: float = WAIT_S) -> None:
        self._store = store
        self._wait_s = wait_s

    async def claim(
        self,
        owner: str,
        key: str,
        route: str,
        fingerprint: str,
        new_id: str,
        exists: Callable[[str], Awaitable[bool]],
    ) -> str | None:
        """None: the key is ours, create `new_id` now (inside `guard`). Else the id of the object an earlier
        request with the same key and parameters created (waiting up to `wait_s` for it to exist). Raises 409 for
        a key used with other parameters, or held by a request that does not finish in time."""
        deadline = time.monotonic() + self._wait_s
        while True:
            now = await self._store.now()
            mine = IdempotencyKey(owner, key, route, fingerprint, new_id, int(now))
            held = await self._store.claim_idempotency_key(mine, rule.live_since(now))
            match rule.outcome(held, mine):
                case Outcome.CREATE:
                    return None
                case Outcome.REUSED:
                    raise _reused(key)
            if await exists(held.object_id):
                return held.object_id
            if time.monotonic() >= deadline:
                raise _in_use(key)
            await asyncio.sleep(POLL_S)  # the holder creates it, or fails and gives the key back

    @contextlib.asynccontextmanager
    async def guard(self, owner: str, key: str | None, object_id: str) -> AsyncIterator[None]:
        """Around the creation of a claimed object: on failure the key is given back."""
        try:
            yield
        except BaseException:
            if key is not None:
                await asyncio.shield(self._store.drop_idempotency_key(owner, key, object_id))
            raise
