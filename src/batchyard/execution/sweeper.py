"""The sweeper: ends what has expired and removes blobs nothing needs any more.

Each `Sweeper.sweep` (the worker calls it every 30 s):
- deletes expired files and ends expired uploads (removing their parts' blobs);
- removes the blobs of deleted files that no live batch reads any more (`store.removable_deleted_files`), then
  forgets them; a deleted file whose batch is still running keeps its blob until that batch is final;
- at most once per `orphan_interval`, removes what a crash left behind, when it is older than `orphan_age` (an
  hour) and provably unreferenced: part blobs (`parts/<batch>/...`) of batches that are final or unknown, file
  blobs (`files/...`) and upload parts (`uploads/...`) no record needs (`store.needed_blob_keys`), and writes that
  were never committed (local temp files, S3 multipart uploads: `blobs.remove_abandoned_writes`).

Never removed: a blob of a live batch's input file, a part of a batch that is not final (its running shards write
there), a blob younger than `orphan_age` (a file being uploaded is committed, then its row inserted: the two are
milliseconds apart). An orphan must also be found unreferenced twice, `confirm_after` apart, before it goes: S3
dates a multipart object by the upload's start, so a long compose that has just completed looks old; the second
look sees the row its finalizer has committed since.

Blob errors are not caught here: a storage outage ends the sweep, and the next one starts over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from batchyard.blobs.base import BlobStore
from batchyard.store.base import MetadataStore

log = logging.getLogger("batchyard.sweeper")

ORPHAN_AGE = 3600.0
ORPHAN_INTERVAL = 600.0
CONFIRM_AFTER = 300.0
_PAGE = 500
_PREFIXES = ("files/", "uploads/", "parts/", "probe/")  # probe/: a storage probe whose delete failed


@dataclass(slots=True)
class SweepReport:
    expired_files: int = 0
    expired_uploads: int = 0
    deleted_file_blobs: int = 0  # blobs of deleted files, removed once no live batch read them
    orphans: int = 0  # blobs no record needs (a crash left them)
    abandoned_writes: int = 0  # temp files / multipart uploads never committed
    orphans_suspected: int = 0  # found unreferenced once: removed on a later sweep if still so

    @property
    def removed(self) -> int:
        return self.deleted_file_blobs + self.orphans + self.abandoned_writes


@dataclass
class Sweeper:
    store: MetadataStore
    blobs: BlobStore
    orphan_age: float = ORPHAN_AGE
    orphan_interval: float = ORPHAN_INTERVAL
    confirm_after: float = CONFIRM_AFTER
    limit: int = 100
    _suspects: dict[str, float] = field(default_factory=dict)  # key -> when first found unreferenced
    _last_orphan_scan: float | None = None

    async def sweep(self, now: float | None = None) -> SweepReport:
        """One pass; `now` is the store's clock unless given (tests pass a later one)."""
        now = await self.store.now() if now is None else now
        report = SweepReport()
        await self._expired(report)
        await self._deleted_files(report)
        if self._last_orphan_scan is None or now - self._last_orphan_scan >= self.orphan_interval:
            await self._orphans(now, report)
            report.abandoned_writes = await self.blobs.remove_abandoned_writes(now - self.orphan_age)
            self._last_orphan_scan = now
        if report.removed or report.expired_files or report.expired_uploads:
            log.info("sweep: %s", report)
        return report

    async def _expired(self, report: SweepReport) -> None:
        """Delete expired files, and end expired uploads (removing the blobs of their parts)."""
        for f in await self.store.expired_files(self.limit):
            res = await self.store.delete_file(f.owner, f.id)
            if res is not None:
                report.expired_files += 1
                if res[1]:
                    await self.blobs.delete(f.blob_key)
                    await self.store.forget_file_blob(f.id)
        for u in await self.store.expired_uploads(self.limit):
            if await self.store.finish_upload(u.owner, u.id, "expired", None):
                report.expired_uploads += 1
                await self.blobs.delete_quietly(p.blob_key for p in await self.store.get_upload_parts(u.id))

    async def _deleted_files(self, report: SweepReport) -> None:
        for f in await self.store.removable_deleted_files(self.limit):
            await self.blobs.delete(f.blob_key)
            await self.store.forget_file_blob(f.id)
            report.deleted_file_blobs += 1

    async def _orphans(self, now: float, report: SweepReport) -> None:
        seen: set[str] = set()
        for prefix in _PREFIXES:
            page: list[str] = []
            async for key, mtime in self.blobs.list_keys(prefix):
                if mtime <= now - self.orphan_age:
                    page.append(key)
                if len(page) >= _PAGE:
                    await self._judge(page, now, report, seen)
                    page = []
            if page:
                await self._judge(page, now, report, seen)
        for gone in set(self._suspects) - seen:  # removed, or needed again, since
            del self._suspects[gone]

    async def _judge(self, keys: list[str], now: float, report: SweepReport, seen: set[str]) -> None:
        """Remove the keys of this page that no record needs and that were found so `confirm_after` ago."""
        parts = [k for k in keys if k.startswith("parts/")]
        others = [k for k in keys if not k.startswith("parts/")]
        done = await self.store.batches_done_with(
            sorted({k.split("/")[1] for k in parts if k.count("/") >= 2})
        )
        unneeded = [k for k in parts if k.count("/") >= 2 and k.split("/")[1] in done]
        if others:
            needed = await self.store.needed_blob_keys(others)
            unneeded += [k for k in others if k not in needed]
        for key in unneeded:
            seen.add(key)
            first = self._suspects.setdefault(key, now)
            if now - first < self.confirm_after:
                report.orphans_suspected += 1
                continue
            await self.blobs.delete(key)
            del self._suspects[key]
            report.orphans += 1
