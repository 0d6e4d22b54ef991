"""Caps and rates per owner: what one owner (a static API key, or a project: every key of it together) may hold at
once (stored bytes, files, pending uploads, unfinished batches) and how fast it may create (files, uploads, batches).

Caps are checked before the work that would pass them (and, for an upload whose size is known only at its end,
again at its end). A request that passed holds what it will store (`Hold`: a file and its bytes, an upload, a
batch) until its object is in the store, and the checks of the owner's other requests in this API process count
those holds: a tenant who sends a hundred uploads at once gets as many as fit under the cap, not a hundred (each
check and the hold it takes run with no await between them). Across API processes the holds are not seen: N
replicas racing can each pass one request past a cap. A cap of 0 means no limit. A project's cap is the
`project_*` setting when set, else the per-key one (the lower of the two when both are).

The create rate (`project_create_rpm`) is counted in each API process over a sliding minute: with N API replicas an
owner may create up to N times the rate. Beyond it: 429 `rate_limit_exceeded` with Retry-After, which clients retry
(unlike a cap's 429, `insufficient_quota`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Iterator

from batchyard.config import Settings
from batchyard.domain.tenancy import PROJECT_ID
from batchyard.errors import RateLimited, TooManyRequests
from batchyard.store.base import MetadataStore, OwnerUsage

WINDOW_S = 60.0
MAX_OWNERS = 10_000  # owners whose recent creates are remembered at once (idle ones are dropped first)


def _over(cap: int, value: int) -> bool:
    return cap > 0 and value > cap


def _cap(per_key: int, per_project: int, owner: str) -> int:
    if PROJECT_ID.fullmatch(owner) is None or per_project == 0:
        return per_key
    return per_project if per_key == 0 else min(per_key, per_project)


def _refuse(owner: str, what: str, cap: int) -> TooManyRequests:
    holder = "this project's" if PROJECT_ID.fullmatch(owner) else "this API key's"
    return TooManyRequests(
        f"You have reached {holder} limit of {what} ({cap}): delete some, or wait for them to finish.",
        code="insufficient_quota",
    )


class CreateRates:
    """The creates of each owner in the last minute, in this process (shared by the routes: `Services.rates`).
    `what` names what is counted in the 429's message (the online front door counts its requests with one)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, what: str = "creates (files, uploads, batches)"
    ) -> None:
        self._clock = clock
        self._what = what
        self._seen: dict[str, deque[float]] = {}

    def admit(self, owner: str, rpm: int) -> None:
        """Count one create of `owner`, or raise RateLimited when it made `rpm` in the last minute."""
        if rpm <= 0:
            return
        now = self._clock()
        recent = self._seen.pop(owner, None) or deque()
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        self._seen[owner] = recent  # most recently used last
        if len(recent) >= rpm:
            wait = max(1, math.ceil(recent[0] + WINDOW_S - now))
            raise RateLimited(
                f"Rate limit reached for {self._what} of {owner} on requests per min "
                f"(RPM): Limit {rpm}, Used {len(recent)}, Requested 1. Please try again in {wait}s.",
                retry_after=wait,
            )
        recent.append(now)
        while len(self._seen) > MAX_OWNERS:
            del self._seen[next(iter(self._seen))]


@dataclasses.dataclass(eq=False, slots=True)
class Hold:
    """What one request is about to store, counted against its owner's caps until it is stored or has failed."""

    owner: str
    files: int = 0
    stored_bytes: int = 0
    pending_uploads: int = 0
    active_batches: int = 0


class Holds:
    """The holds of this API process's requests in flight, per owner (shared by the routes: `Services.holds`)."""

    def __init__(self) -> None:
        self._by_owner: dict[str, list[Hold]] = {}

    @contextlib.contextmanager
    def holding(self, owner: str) -> Iterator[Hold]:
        """A hold, empty until a check fills it, released when the block ends (after the insert)."""
        hold = Hold(owner)
        self._by_owner.setdefault(owner, []).append(hold)
        try:
            yield hold
        finally:
            held = self._by_owner[owner]
            held.remove(hold)
            if not held:
                del self._by_owner[owner]

    def add_to(self, usage: OwnerUsage, owner: str, but: Hold | None) -> OwnerUsage:
        """`usage` (as stored) with the owner's holds, except `but` (the asking request's own)."""
        others = [h for h in self._by_owner.get(owner, ()) if h is not but]
        if not others:
            return usage
        return OwnerUsage(
            files=usage.files + sum(h.files for h in others),
            stored_bytes=usage.stored_bytes + sum(h.stored_bytes for h in others),
            pending_uploads=usage.pending_uploads + sum(h.pending_uploads for h in others),
            active_batches=usage.active_batches + sum(h.active_batches for h in others),
        )


class Quotas:
    def __init__(
        self,
        store: MetadataStore,
        settings: Settings,
        rates: CreateRates | None = None,
        holds: Holds | None = None,
    ) -> None:
        self._store = store
        self._s = settings
        self._rates = rates or CreateRates()
        self._holds = holds or Holds()

    def holding(self, owner: str) -> contextlib.AbstractContextManager[Hold]:
        return self._holds.holding(owner)

    def admit(self, owner: str) -> None:
        """One more create (a file, an upload, a batch) of `owner` fits in its rate."""
        self._rates.admit(owner, self._s.project_create_rpm)

    async def usage(self, owner: str, hold: Hold | None = None) -> OwnerUsage:
        """What `owner` holds: stored, and held by this process's other requests (all but `hold`)."""
        return self._holds.add_to(await self._store.owner_usage(owner), owner, hold)

    def check_file(self, usage: OwnerUsage, size: int, owner: str = "", hold: Hold | None = None) -> None:
        """One more file of `size` bytes fits; `hold` (when given) then holds it."""
        if _over(self._s.max_files_per_key, usage.files + 1):
            raise _refuse(owner, "files", self._s.max_files_per_key)
        cap = _cap(self._s.max_stored_bytes_per_key, self._s.project_max_stored_bytes, owner)
        if _over(cap, usage.stored_bytes + size):
            raise _refuse(owner, "stored bytes", cap)
        if hold is not None:
            hold.files, hold.stored_bytes = 1, size

    async def room_for_file(self, hold: Hold, size: int) -> None:
        """One more file of `size` bytes fits, and `hold` holds it."""
        self.check_file(await self.usage(hold.owner, hold), size, hold.owner, hold)

    async def room_for_upload(self, hold: Hold, size: int) -> None:
        """One more pending upload, for a file of `size` bytes, fits (and its create fits in the rate); `hold`
        holds the upload."""
        owner = hold.owner
        usage = await self.usage(owner, hold)
        if _over(self._s.max_pending_uploads_per_key, usage.pending_uploads + 1):
            raise _refuse(owner, "uploads in progress", self._s.max_pending_uploads_per_key)
        self.check_file(usage, size, owner)
        self.admit(owner)
        hold.pending_uploads = 1

    async def room_for_batch(self, hold: Hold) -> None:
        """One more unfinished batch fits (and its create fits in the rate); `hold` holds it."""
        owner = hold.owner
        usage = await self.usage(owner, hold)
        cap = _cap(self._s.max_active_batches_per_key, self._s.project_max_batches_in_progress, owner)
        if _over(cap, usage.active_batches + 1):
            raise _refuse(owner, "batches in progress", cap)
        self.admit(owner)
        hold.active_batches = 1
