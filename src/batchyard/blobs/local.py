"""BlobStore on a local directory: atomic writes (temp file + fsync + rename), streamed reads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from batchyard.blobs.base import BlobInfo, BlobStore, BlobWriter
from batchyard.errors import BlobError, BlobNotFound

_FLUSH_AT = 1 << 20
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


class SizeExceeded(BlobError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"blob exceeds {limit} bytes")
        self.limit = limit


class _LocalWriter(BlobWriter):
    def __init__(self, key: str, final: Path, max_bytes: int | None) -> None:
        self._key = key
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        self._max = max_bytes
        self._buf: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._sha = hashlib.sha256()
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: bytes) -> None:
        if self._max is not None and self._size + len(data) > self._max:
            raise SizeExceeded(self._max)
        self._size += len(data)
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered >= _FLUSH_AT:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        # Off the event loop, and side by side: hashlib and file writes both release the GIL on large buffers,
        # so hashing overlaps the copy into the page cache (each takes a few hundred ms per 200 MB here).
        await asyncio.gather(
            asyncio.to_thread(self._sha.update, data), asyncio.to_thread(self._fh.write, data)
        )

    async def commit(self) -> BlobInfo:
        await self._flush()

        def finish() -> None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self._final)

        await asyncio.to_thread(finish)
        return BlobInfo(self._key, self._size, self._sha.hexdigest())

    async def abort(self) -> None:
        self._buf.clear()
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys are ours, but check anyway: a path never escapes the root.
        parts = key.split("/")
        if not key or not set(key) <= _SAFE or any(p in ("", ".", "..") for p in parts):
            raise BlobError(f"invalid blob key {key!r}")
        path = self.root / key
        if self.root not in path.parents:
            raise BlobError(f"invalid blob key {key!r}")
        return path

    async def open_writer(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        return _LocalWriter(key, path, max_bytes)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    return fh.read(end - start)
            except FileNotFoundError as e:
                raise BlobNotFound(key) from e
            except OSError as e:
                raise BlobError(f"reading {key}: {e}") from e

        return await asyncio.to_thread(read)

    async def stream(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as e:
            raise BlobNotFound(key) from e
        try:
            while True:
                chunk = await asyncio.to_thread(fh.read, chunk_size)
                if not chunk:
                    break
                yield chunk
        finally:
            fh.close()

    async def compose(self, key: str, sources: Sequence[str]) -> BlobInfo:
        return await self.compose_streamed(key, sources)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).exists)
