"""Idempotent creates (`Idempotency-Key` on `POST /v1/files`, `/v1/uploads`, `/v1/batches`): the rule, pure.

The first request with a key claims it (insert-first on the store's unique (owner, key)) and names the object it is
about to create; a request with the same key and the same parameters gets that object; one with other parameters
(or sent to another route) is refused. A key is remembered for `TTL_S` seconds, then it may be used afresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

import orjson

TTL_S = 24 * 3600
MAX_KEY_CHARS = 255  # Stripe's limit


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    owner: str
    key: str
    route: str  # "files", "uploads" or "batches"
    fingerprint: str  # the request's parameters, hashed (`fingerprint`)
    object_id: str  # the object the first request creates
    created_at: int


class Outcome(StrEnum):
    CREATE = "create"  # the key is ours: create the object we named
    REPLAY = "replay"  # an earlier request with the same parameters: answer its object
    REUSED = "reused"  # the key was used with other parameters: refuse


def fingerprint(params: object) -> str:
    """A stable hash of a request's parameters (JSON, keys sorted)."""
    return hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()


def outcome(held: IdempotencyKey, mine: IdempotencyKey) -> Outcome:
    """What a request (`mine`) does, given the row the store holds for its key after its claim (`held`)."""
    if held.object_id == mine.object_id:
        return Outcome.CREATE
    if held.route != mine.route or held.fingerprint != mine.fingerprint:
        return Outcome.REUSED
    return Outcome.REPLAY


def live_since(now: float) -> int:
    """Rows created before this (on the store's clock) are forgotten: their key may be claimed again."""
    return int(now) - TTL_S
