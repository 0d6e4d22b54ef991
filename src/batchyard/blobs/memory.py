"""BlobStore in memory: the fake for unit tests of the layers above the blob stores.

It keeps the contract of the local and S3 stores (tests/contract/test_blob_contract.py runs on all three): nothing is
visible under a key before `commit`, `abort` leaves nothing, a missing key is BlobNotFound, an invalid key a
BlobError, a writer past its cap raises SizeExceeded (a BlobError). Keys follow the S3 store's rule (segments of
letters, digits and `-_.`, none of them `.` or `..`). A writer's bytes stay its own until it commits; `pending` lists
the keys of writers neither committed nor aborted, which is what `remove_abandoned_writes` drops.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

from batchyard.blobs.base import BlobInfo, BlobStore, BlobWriter, check_key
from batchyard.errors import BlobNotFound


class _MemoryWriter(BlobWriter):
    def __init__(self, store: MemoryBlobStore, key: str, max_bytes: int | None) -> None:
        super().__init__(key, max_bytes)
        self._store = store
        self._chunks: list[bytes] = []
        self._sha = hashlib.sha256()
        self.last_write = store.clock()

    async def write(self, data: bytes) -> None:
        if (error := self._admit(len(data))) is not None:
            raise error
        self._chunks.append(bytes(data))
        self._size += len(data)
        self._sha.update(data)
        self.last_write = self._store.clock()

    async def commit(self) -> BlobInfo:
        self._check_open()
        self._state = "committed"
        self._store._writers.discard(self)
        self._store._blobs[self._key] = (b"".join(self._chunks), self._store.clock())
        self._chunks.clear()
        return BlobInfo(self._key, self._size, self._sha.hexdigest())

    async def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._store._writers.discard(self)
        self._chunks.clear()

    @property
    def key(self) -> str:
        return self._key


class MemoryBlobStore(BlobStore):
    """Blobs in a dict: key -> (bytes, commit time). `clock` gives the Unix time that `list_keys` reports."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._writers: set[_MemoryWriter] = set()

    @property
    def keys(self) -> list[str]:
        """Every committed key, sorted."""
        return sorted(self._blobs)

    @property
    def pending(self) -> list[str]:
        """The keys of writers opened and neither committed nor aborted, sorted."""
        return sorted(w.key for w in self._writers)

    def _get(self, key: str) -> bytes:
        try:
            return self._blobs[check_key(key)][0]
        except KeyError:
            raise BlobNotFound(key) from None

    async def open_writer(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        writer = _MemoryWriter(self, check_key(key), max_bytes)
        self._writers.add(writer)
        return writer

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._get(key)[start:end]

    async def stream(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        data = self._get(key)
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]

    async def compose(self, key: str, sources: Sequence[str]) -> BlobInfo:
        check_key(key)
        return await self.compose_streamed(key, sources)

    async def delete(self, key: str) -> None:
        self._blobs.pop(check_key(key), None)

    async def exists(self, key: str) -> bool:
        return check_key(key) in self._blobs

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        for key, (_, mtime) in list(self._blobs.items()):
            if key.startswith(prefix):
                yield key, mtime

    async def remove_abandoned_writes(self, before: float) -> int:
        stale = [w for w in self._writers if w.last_write < before]
        for writer in stale:
            await writer.abort()
        return len(stale)
