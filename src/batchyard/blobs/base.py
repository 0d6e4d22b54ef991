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


class BlobWriter(ABC):
    """A blob being written. Nothing is visible under the key until `commit`; `abort` leaves nothing behind."""

    @abstractmethod
    async def write(self, data: bytes) -> None: ...
    @abstractmethod
    async def commit(self) -> BlobInfo: ...
    @abstractmethod
    async def abort(self) -> None: ...

    @property
    @abstractmethod
    def size(self) -> int: ...


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
