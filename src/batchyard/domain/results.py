"""Partial results (`GET /v1/batches/{id}/results`, a batchyard extension): the cursor, pure.

Results are the committed lines of a batch, shard by shard in shard order, each shard's output lines before its
error lines. Shards are committed in any order, so "after" cannot be a position alone: the cursor holds the shards
already read in full (as ranges of shard indexes, few because workers take shards in order) and, when a page ended
inside a shard, where in it (`At`). A client that follows the cursor sees every committed line exactly once.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import IntEnum

import orjson

MAX_CURSOR_CHARS = 64 * 1024


class Kind(IntEnum):
    OUTPUT = 0
    ERROR = 1


@dataclass(frozen=True, slots=True)
class At:
    """Inside shard `shard`: the part `kind` has been read up to `lines` lines (and every earlier kind in full)."""

    shard: int
    kind: Kind
    lines: int


@dataclass(frozen=True, slots=True)
class Cursor:
    read: tuple[tuple[int, int], ...] = ()  # inclusive, sorted, disjoint ranges of shard indexes read in full
    at: At | None = None

    def has_read(self, shard: int) -> bool:
        return any(lo <= shard <= hi for lo, hi in self.read)

    def skip(self, shard: int, kind: Kind) -> int:
        """How many lines of this part the client has; -1 for the whole part."""
        if self.has_read(shard):
            return -1
        if self.at is None or self.at.shard != shard:
            return 0
        if kind < self.at.kind:
            return -1
        return self.at.lines if kind == self.at.kind else 0

    def done(self, shard: int) -> Cursor:
        """The cursor once `shard` is read in full."""
        ranges = sorted([*self.read, (shard, shard)])
        merged: list[tuple[int, int]] = []
        for lo, hi in ranges:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        at = None if self.at is not None and self.at.shard == shard else self.at
        return Cursor(tuple(merged), at)

    def inside(self, shard: int, kind: Kind, lines: int) -> Cursor:
        return Cursor(self.read, At(shard, kind, lines))

    def encode(self) -> str:
        at = None if self.at is None else [self.at.shard, int(self.at.kind), self.at.lines]
        raw = orjson.dumps({"r": [list(r) for r in self.read], "a": at})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(text: str) -> Cursor | None:
    """The cursor a page returned; None when `text` is not one."""
    if len(text) > MAX_CURSOR_CHARS:
        return None
    try:
        obj = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        ranges = tuple((int(lo), int(hi)) for lo, hi in obj["r"])
        a = obj["a"]
        at = None if a is None else At(int(a[0]), Kind(int(a[1])), int(a[2]))
    except (binascii.Error, orjson.JSONDecodeError, ValueError, TypeError, KeyError, IndexError):
        return None
    if any(lo > hi or lo < 0 for lo, hi in ranges) or (at is not None and min(at.shard, at.lines) < 0):
        return None
    return Cursor(ranges, at)
