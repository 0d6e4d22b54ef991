"""BlobStore on a local directory: atomic, durable writes (temp file + fsync + rename + fsync of the directory).

Every OSError becomes a BlobError at this edge (`_os_errors`): ENOSPC and EDQUOT are `BlobStorageFull`, a missing
blob on read is `BlobNotFound`, anything else `BlobError`. A writer that fails (or is aborted) removes its temp file
before the error reaches the caller, so nothing half-written is left behind and nothing is ever visible under a key
before `commit`. Temp files are named `.<name>.<random>.tmp` next to their blob; `list_keys` never shows them and
`remove_abandoned_writes` removes those a crash left behind.

Durability: `commit` fsyncs the file, renames it over the key, then fsyncs the directory, so a committed blob survives
a power loss (the rename is in the directory's data, not the file's); a directory made for a new key has its parent
fsynced too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from batchyard.blobs.base import BlobInfo, BlobStore, BlobWriter, check_key
from batchyard.errors import BlobError, BlobNotFound, BlobStorageFull

_FLUSH_AT = 1 << 20
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def os_error(key: str, doing: str, e: OSError) -> BlobError:
    """The BlobError for an OSError met while `doing` something to `key`."""
    message = f"{doing} {key}: {e.strerror or e}"
    if e.errno in _FULL:
        return BlobStorageFull(message, errno=e.errno)
    return BlobError(message)


@contextlib.contextmanager
def _os_errors(key: str, doing: str) -> Iterator[None]:
    """The one place an OSError of this store becomes a BlobError."""
    try:
        yield
    except OSError as e:
        raise os_error(key, doing, e) from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalWriter(BlobWriter):
    def __init__(self, key: str, final: Path, tmp: Path, fh: BinaryIO, max_bytes: int | None) -> None:
        super().__init__(key, max_bytes)
        self._final = final
        self._tmp = tmp
        self._fh = fh
        self._buf: list[bytes] = []
        self._buffered = 0
        self._sha = hashlib.sha256()

    async def write(self, data: bytes) -> None:
        if (error := self._admit(len(data))) is not None:
            raise error
        self._size += len(data)
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered >= _FLUSH_AT:
            await self._or_abort(self._flush())

    async def _or_abort(self, op: Awaitable[None]) -> None:
        try:
            await op
        except BaseException:
            await self.abort()
            raise

    async def _flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0

        def write() -> None:
            with _os_errors(self._key, "writing"):
                self._fh.write(data)

        # Off the event loop, and side by side: hashlib and file writes both release the GIL on large buffers,
        # so hashing overlaps the copy into the page cache (each takes a few hundred ms per 200 MB here).
        # Both are awaited to the end, so the file is not closed under a write still running.
        results = await asyncio.gather(
            asyncio.to_thread(self._sha.update, data), asyncio.to_thread(write), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _finish(self) -> None:
        with _os_errors(self._key, "committing"):
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self._final)
        # The blob is whole and in place; the directory's fsync makes the rename itself survive a power loss.
        with _os_errors(self._key, "syncing the directory of"):
            fsync_dir(self._final.parent)

    async def commit(self) -> BlobInfo:
        self._check_open()
        await self._or_abort(self._flush())
        await self._or_abort(asyncio.to_thread(self._finish))
        self._state = "committed"
        return BlobInfo(self._key, self._size, self._sha.hexdigest())

    async def abort(self) -> None:
        """Remove the temp file, even when closing it fails (a buffered close may write, and hit ENOSPC)."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buf.clear()

        def discard() -> None:
            with contextlib.suppress(
                OSError
            ):  # the bytes are thrown away: a failed flush of them changes nothing
                self._fh.close()
            with _os_errors(self._key, "removing the temp file of"):
                self._tmp.unlink(missing_ok=True)

        await asyncio.to_thread(discard)


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        with _os_errors(str(self.root), "creating the blob directory"):
            self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys are ours, but check anyway: a path never escapes the root.
        path = self.root / check_key(key)
        if self.root not in path.parents:
            raise BlobError(f"invalid blob key {key!r}")
        return path

    def _make_dirs(self, key: str, folder: Path) -> None:
        """Make the folders of a new key, fsyncing the parent of each one made (so the blob's path survives)."""
        missing: list[Path] = []
        with _os_errors(key, "creating the folder of"):
            while not folder.is_dir():
                if folder == self.root:  # removed since the store was made (`batchyard run` starting over)
                    self.root.mkdir(parents=True, exist_ok=True)
                    break
                missing.append(folder)
                folder = folder.parent
            for made in reversed(missing):
                made.mkdir(exist_ok=True)
                fsync_dir(made.parent)

    async def open_writer(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")

        def start() -> BinaryIO:
            self._make_dirs(key, path.parent)
            with _os_errors(key, "opening a writer for"):
                return open(tmp, "wb")  # closed in commit/abort

        fh = await asyncio.to_thread(start)
        return _LocalWriter(key, path, tmp, fh, max_bytes)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    return fh.read(max(0, end - start))
            except FileNotFoundError as e:
                raise BlobNotFound(key) from e
            except OSError as e:
                raise os_error(key, "reading", e) from e

        return await asyncio.to_thread(read)

    async def stream(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as e:
            raise BlobNotFound(key) from e
        except OSError as e:
            raise os_error(key, "opening", e) from e
        try:
            while True:
                with _os_errors(key, "reading"):
                    chunk = await asyncio.to_thread(fh.read, chunk_size)
                if not chunk:
                    break
                yield chunk
        finally:
            fh.close()

    async def compose(self, key: str, sources: Sequence[str]) -> BlobInfo:
        # Through a writer, so the composed blob gets the same fsync + rename + directory fsync as any other.
        return await self.compose_streamed(key, sources)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def unlink() -> None:
            with _os_errors(key, "deleting"):
                path.unlink(missing_ok=True)

        await asyncio.to_thread(unlink)

    async def exists(self, key: str) -> bool:
        path = self._path(key)

        def check() -> bool:
            with _os_errors(key, "looking up"):
                return path.is_file()

        return await asyncio.to_thread(check)

    # -- blob lifecycle (sweeper) ---------------------------------------------------------------------------
    def _scan(self, prefix: str, tmp: bool) -> list[tuple[str, float]]:
        """(key, mtime) of every blob (tmp=False) or temp file (tmp=True) whose key starts with `prefix`."""
        top = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if self.root != top and self.root not in top.parents:
            raise BlobError(f"invalid blob key prefix {prefix!r}")
        found: list[tuple[str, float]] = []

        def failed(e: OSError) -> None:
            if not isinstance(e, FileNotFoundError):  # a folder removed while walking is simply empty
                raise os_error(prefix, "listing", e) from e

        for folder, _dirs, names in os.walk(top, onerror=failed):
            base = Path(folder).relative_to(self.root).as_posix()
            for name in names:
                key = name if base == "." else f"{base}/{name}"
                if _is_tmp(name) != tmp or not key.startswith(prefix):
                    continue
                try:
                    found.append((key, os.stat(os.path.join(folder, name)).st_mtime))
                except FileNotFoundError:
                    continue  # deleted (or renamed into place) while we looked
                except OSError as e:
                    raise os_error(key, "listing", e) from e
        return found

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        for item in await asyncio.to_thread(self._scan, prefix, False):
            yield item

    async def remove_abandoned_writes(self, before: float) -> int:
        """Remove temp files last written before `before`. A live writer writes its file at every MiB it is given
        (and opens it at once), so an hour-old mtime means a writer that crashed or has stalled for an hour."""

        def sweep() -> int:
            removed = 0
            for name, mtime in self._scan("", True):
                if mtime < before:
                    with _os_errors(name, "removing the abandoned temp file"):
                        (self.root / name).unlink(missing_ok=True)
                    removed += 1
            return removed

        return await asyncio.to_thread(sweep)
