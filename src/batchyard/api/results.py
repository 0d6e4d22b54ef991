"""`GET /v1/batches/{id}/results` (a batchyard extension): the committed lines of a batch so far, as JSONL pages.

While the batch runs, lines come from the committed parts of its done shards; once it has ended (the parts are
removed then), from its output and error files, which are those parts concatenated in shard order, so the same
cursor goes on across the end of the batch. The cursor is `domain/results.py`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import orjson

from batchyard.blobs.base import BlobStore
from batchyard.domain.models import BatchRecord, ShardRecord
from batchyard.domain.results import Cursor, Kind
from batchyard.domain.states import TERMINAL
from batchyard.errors import BlobNotFound
from batchyard.store.base import MetadataStore

MAX_PAGE_BYTES = 16 * 1024 * 1024  # a page stops after the line that takes it past this


@dataclass(slots=True)
class Page:
    lines: list[bytes]
    cursor: Cursor
    full: bool  # stopped at the limit: more lines are there now


async def split_lines(stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes]:
    """The lines of a stream, each with its newline."""
    rest = b""
    async for chunk in stream:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest + b"\n"


class _FileLines:
    """One output or error file of an ended batch, read forward once: the lines of consecutive shards."""

    def __init__(self, blobs: BlobStore, key: str | None) -> None:
        self._lines = None if key is None else split_lines(blobs.stream(key))
        self._pos = 0

    async def close(self) -> None:
        if self._lines is not None:
            await self._lines.aclose()

    async def take(self, start: int, count: int) -> AsyncGenerator[bytes]:
        if self._lines is None:
            return
        while self._pos < start + count:
            line = await anext(self._lines, None)
            if line is None:
                return
            self._pos += 1
            if self._pos > start:
                yield line


def _wanted(line: bytes, custom_id: str | None) -> bool:
    if custom_id is None:
        return True
    needle = orjson.dumps(custom_id)
    if needle not in line:  # cheap test first
        return False
    try:
        return bool(orjson.loads(line).get("custom_id") == custom_id)
    except (orjson.JSONDecodeError, AttributeError):
        return False


class ResultReader:
    def __init__(self, store: MetadataStore, blobs: BlobStore) -> None:
        self._store = store
        self._blobs = blobs

    async def page(
        self, batch: BatchRecord, cursor: Cursor, kinds: tuple[Kind, ...], custom_id: str | None, limit: int
    ) -> Page:
        try:
            return await self._page(batch, cursor, kinds, custom_id, limit)
        except BlobNotFound:  # the batch ended meanwhile and its parts went: read its files
            again = await self._store.get_batch(None, batch.id)
            if again is None or again.status not in TERMINAL:
                raise
            return await self._page(again, cursor, kinds, custom_id, limit)

    async def _files(self, batch: BatchRecord) -> dict[Kind, _FileLines]:
        files: dict[Kind, _FileLines] = {}
        for kind, fid in ((Kind.OUTPUT, batch.output_file_id), (Kind.ERROR, batch.error_file_id)):
            f = None if fid is None else await self._store.get_file(batch.owner, fid)
            files[kind] = _FileLines(self._blobs, None if f is None else f.blob_key)
        return files

    async def _page(
        self, batch: BatchRecord, cursor: Cursor, kinds: tuple[Kind, ...], custom_id: str | None, limit: int
    ) -> Page:
        files = await self._files(batch) if batch.status in TERMINAL else None
        try:
            return await self._read(batch, cursor, kinds, custom_id, limit, files)
        finally:
            for f in (files or {}).values():
                await f.close()

    async def _read(
        self,
        batch: BatchRecord,
        cursor: Cursor,
        kinds: tuple[Kind, ...],
        custom_id: str | None,
        limit: int,
        files: dict[Kind, _FileLines] | None,
    ) -> Page:
        offsets = {Kind.OUTPUT: 0, Kind.ERROR: 0}  # lines of the file before this shard's
        out: list[bytes] = []
        size = 0
        for shard in await self._store.done_shards(batch.id):
            counts = {Kind.OUTPUT: shard.completed, Kind.ERROR: shard.failed}
            for kind in Kind:
                skip = cursor.skip(shard.index, kind)
                if kind in kinds and skip >= 0 and skip < counts[kind]:
                    n = skip
                    lines = self._lines(shard, kind, files, offsets[kind], skip, counts[kind] - skip)
                    async with contextlib.aclosing(lines):
                        async for line in lines:
                            n += 1
                            if not _wanted(line, custom_id):
                                continue
                            out.append(line)
                            size += len(line)
                            if len(out) >= limit or size >= MAX_PAGE_BYTES:
                                within = n < counts[kind] or kind == Kind.OUTPUT
                                nxt = (
                                    cursor.inside(shard.index, kind, n)
                                    if within
                                    else cursor.done(shard.index)
                                )
                                return Page(out, nxt, True)
                offsets[kind] += counts[kind]
            cursor = cursor.done(shard.index)
        return Page(out, cursor, False)

    def _lines(
        self,
        shard: ShardRecord,
        kind: Kind,
        files: dict[Kind, _FileLines] | None,
        offset: int,
        skip: int,
        count: int,
    ) -> AsyncGenerator[bytes]:
        """`count` lines of the shard's `kind` part after its first `skip`: from the part while the batch runs,
        else from the file, where the part begins at line `offset`."""
        if files is not None:
            return files[kind].take(offset + skip, count)
        return self._part(shard.out_key if kind == Kind.OUTPUT else shard.err_key, skip, count)

    async def _part(self, key: str | None, skip: int, count: int) -> AsyncGenerator[bytes]:
        if key is None:
            return
        i = 0
        async for line in split_lines(self._blobs.stream(key)):
            i += 1
            if i > skip:
                yield line
            if i >= skip + count:
                return
