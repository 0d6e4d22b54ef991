"""The BlobStore interface: streamed writes with a size cap, ranged reads, composition, deletion, listing.

Every failure is a BlobError (errors.py): BlobNotFound for a missing key, BlobStorageFull when the storage is full,
BlobUnavailable when it cannot be reached; no driver or OS exception leaves a store.

Keys are chosen by batchyard (`files/<id>`, `parts/<batch>/<shard>.<attempt>.out`), never by a client.
"""

from __future__ import annotations

import contextlib
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from batchyard.errors import BlobError


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    sha256: str


class SizeExceeded(BlobError):
    """A writer was given more than its `max_bytes`."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"blob exceeds {limit} bytes")
        self.limit = limit


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


def check_key(key: str) -> str:
    """`key`, or BlobError when it is not one batchyard makes: segments of [A-Za-z0-9-_.] joined by `/`, none empty,
    `.` or `..` (so that a key never names a path outside a store's root)."""
    if not key or not set(key) <= _SAFE or any(p in ("", ".", "..") for p in key.split("/")):
        raise BlobError(f"invalid blob key {key!r}")
    return key


class BlobWriter(ABC):
    """A blob being written. Nothing is visible under the key until `commit`; `abort` leaves nothing behind.

    The state every writer keeps is here: its size under its cap (`_admit`), and open -> committed or aborted."""

    def __init__(self, key: str, max_bytes: int | None) -> None:
        self._key = key
        self._max = max_bytes
        self._size = 0
        self._state = "open"

    @abstractmethod
    async def write(self, data: bytes) -> None: ...
    @abstractmethod
    async def commit(self) -> BlobInfo: ...
    @abstractmethod
    async def abort(self) -> None: ...

    @property
    def size(self) -> int:
        return self._size

    def _check_open(self) -> None:
        if self._state != "open":
            raise BlobError(f"writer for {self._key} is already {self._state}")

    def _admit(self, n: int) -> SizeExceeded | None:
        """Check that `n` more bytes may be written (the writer is open, its cap not passed); the error when they
        may not be (the caller cleans up, then raises it)."""
        self._check_open()
        if self._max is not None and self._size + n > self._max:
            return SizeExceeded(self._max)
        return None


class BlobStore(ABC):
    @abstractmethod
    async def open_writer(self, key: str, *, max_bytes: int | None = None) -> BlobWriter: ...
    @abstractmethod
    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the blob (callers keep ranges small: one shard)."""

    @abstractmethod
    def stream(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]: ...
    @abstractmethod
    async def compose(self, key: str, sources: Sequence[str]) -> BlobInfo:
        """Write the concatenation of sources under key, streamed, replacing any earlier blob there."""

    @abstractmethod
    async def delete(self, key: str) -> None: ...
    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    # blob lifecycle (sweeper)
    @abstractmethod
    def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        """(key, last-modified Unix time) of every committed blob whose key starts with `prefix`, in no particular
        order (a writer's uncommitted bytes are never listed)."""

    @abstractmethod
    async def remove_abandoned_writes(self, before: float) -> int:
        """Remove what writers that never committed left behind (local temp files, S3 multipart uploads) whose
        last write is older than `before` (Unix time); returns how many were removed."""

    async def probe(self) -> None:
        """Raise BlobError unless the store takes a write now: a small blob is written, committed and deleted.
        A worker that met a storage outage probes before it claims work again, so that no line is sent to an
        upstream while its result could not be stored."""
        key = f"probe/{secrets.token_hex(8)}"
        writer = await self.open_writer(key)
        try:
            await writer.write(b"\0" * 4096)
        except BaseException:
            await writer.abort()
            raise
        await writer.commit()
        await self.delete(key)

    async def delete_quietly(self, keys: Iterable[str]) -> None:
        """Delete blobs nothing needs any more, best effort: one that cannot be deleted now is left behind."""
        for key in keys:
            with contextlib.suppress(BlobError):
                await self.delete(key)

    async def compose_streamed(self, key: str, sources: Sequence[str]) -> BlobInfo:
        """`compose` by reading every source through a writer: for stores with no server-side concatenation."""
        writer = await self.open_writer(key)
        try:
            for src in sources:
                async for chunk in self.stream(src):
                    await writer.write(chunk)
        except BaseException as e:
            try:
                await writer.abort()
            except BlobError as abort_error:
                e.add_note(f"aborting the compose of {key} also failed: {abort_error}")
            raise
        return await writer.commit()

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the calling event loop's connections (stores that hold per-loop clients override this)."""
