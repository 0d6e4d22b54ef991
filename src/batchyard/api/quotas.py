"""Per-key caps: what one API key may hold at once (stored bytes, files, pending uploads, unfinished batches).

Checked before the work that would pass a cap (and, for an upload whose size is known only at its end, again at its
end). Two requests of one key racing past the same cap may both pass: a cap bounds what a key holds to about one
request's worth beyond it, which is what it is for. A cap of 0 means no limit.
"""

from __future__ import annotations

from batchyard.config import Settings
from batchyard.errors import TooManyRequests
from batchyard.store.base import MetadataStore, OwnerUsage


def _over(cap: int, value: int) -> bool:
    return cap > 0 and value > cap


def _refuse(what: str, cap: int) -> TooManyRequests:
    return TooManyRequests(
        f"You have reached this API key's limit of {what} ({cap}): delete some, or wait for them to finish.",
        code="insufficient_quota",
    )


class Quotas:
    def __init__(self, store: MetadataStore, settings: Settings) -> None:
        self._store = store
        self._s = settings

    async def usage(self, owner: str) -> OwnerUsage:
        return await self._store.owner_usage(owner)

    def check_file(self, usage: OwnerUsage, size: int) -> None:
        """One more file of `size` bytes fits."""
        if _over(self._s.max_files_per_key, usage.files + 1):
            raise _refuse("files", self._s.max_files_per_key)
        if _over(self._s.max_stored_bytes_per_key, usage.stored_bytes + size):
            raise _refuse("stored bytes", self._s.max_stored_bytes_per_key)

    async def room_for_file(self, owner: str, size: int) -> None:
        self.check_file(await self.usage(owner), size)

    async def room_for_upload(self, owner: str, size: int) -> None:
        """One more pending upload, for a file of `size` bytes, fits."""
        usage = await self.usage(owner)
        if _over(self._s.max_pending_uploads_per_key, usage.pending_uploads + 1):
            raise _refuse("uploads in progress", self._s.max_pending_uploads_per_key)
        self.check_file(usage, size)

    async def room_for_batch(self, owner: str) -> None:
        usage = await self.usage(owner)
        if _over(self._s.max_active_batches_per_key, usage.active_batches + 1):
            raise _refuse("batches in progress", self._s.max_active_batches_per_key)
