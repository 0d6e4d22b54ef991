"""In-memory MetadataStore: a fake for unit tests of the layers above the store (like procrastinate's `testing.py`).

It behaves like `sqlite.SQLiteStore` call for call and runs the same contract suite; nothing outlives the object.
Every method is `async` and never awaits while it reads and writes, so one event loop needs no lock. Records go in
and come out as copies: a caller cannot change the store's state by mutating what it passed or got back. Like the
SQL stores, `metadata` and `errors` are kept as JSON text (values are normalized the same way) and `insert_batch`
keeps only the columns the SQL stores insert (counts and usage are always sums over the batch's shards).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from batchyard.domain.admission import AdmissionLoad
from batchyard.domain.idempotency import IdempotencyKey
from batchyard.domain.models import (
    BatchRecord,
    FileRecord,
    Outcomes,
    ShardClaim,
    ShardRecord,
    ShardResult,
    UploadPartRecord,
    UploadRecord,
    Usage,
    WebhookEvent,
)
from batchyard.domain.states import (
    ACTIVE,
    FINALIZABLE,
    TERMINAL,
    UNFINISHED,
    VALIDATABLE,
    BatchStatus,
    ShardStatus,
    Step,
    UploadStatus,
    WebhookStatus,
    check_shard,
    check_transition,
    finished_upload,
    on,
    settled_webhook,
    webhook_type,
)
from batchyard.domain.tenancy import ApiKeyRecord, KeyHolder, ProjectRecord
from batchyard.domain.validation import ShardPlan
from batchyard.domain.webhooks import MAX_ATTEMPTS_SHOWN, DeliveryAttempt, WebhookEndpoint
from batchyard.errors import StoreError
from batchyard.ids import event_id
from batchyard.store.base import (
    BatchJob,
    BatchStats,
    Heartbeat,
    MetadataStore,
    OverEnqueued,
    OwnerUsage,
    Page,
    UpstreamLoad,
)

S = BatchStatus
Sh = ShardStatus


@dataclass(slots=True)
class _File:
    seq: int
    rec: FileRecord
    deleted: bool = False
    blob_removed: bool = False  # a deleted file's blob is gone (the sweeper removed it)


@dataclass(slots=True)
class _Batch:
    seq: int
    rec: BatchRecord  # metadata, errors, counts and usage unused here: see the JSON fields and the shards
    metadata: str | None = None
    errors: str | None = None
    planned: bool = False
    job_owner: str | None = None
    job_lease_until: float | None = None


@dataclass(slots=True)
class _Shard:
    rec: ShardRecord
    expired: int = 0
    cancelled: int = 0
    upstream_failed: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    retry_at: float | None = None  # a paused shard (its storage was down) is not claimed before this
    started_at: float | None = None  # when its latest attempt started
    done_at: float | None = None

    def claimable(self, now: float) -> bool:
        if self.rec.status == Sh.PENDING:
            return self.retry_at is None or self.retry_at <= now
        return self.lease_ran_out(now)

    def leased(self, now: float) -> bool:
        """Running under a lease that has not run out (it runs up to and including `lease_until`)."""
        return self.rec.status == Sh.RUNNING and self.lease_until is not None and self.lease_until >= now

    def lease_ran_out(self, now: float) -> bool:
        return self.rec.status == Sh.RUNNING and self.lease_until is not None and self.lease_until < now


@dataclass(slots=True)
class _Event:
    seq: int
    ev: WebhookEvent
    next_at: float
    status: WebhookStatus = WebhookStatus.PENDING
    lease_owner: str | None = None
    lease_until: float | None = None
    last_error: str | None = None


@dataclass(slots=True)
class _State:
    files: dict[str, _File] = field(default_factory=dict)
    batches: dict[str, _Batch] = field(default_factory=dict)
    shards: dict[str, dict[int, _Shard]] = field(default_factory=dict)  # batch id -> index -> shard
    uploads: dict[str, UploadRecord] = field(default_factory=dict)
    events: dict[str, _Event] = field(default_factory=dict)  # batch id -> its webhook event
    parts: dict[str, list[UploadPartRecord]] = field(default_factory=dict)  # upload id -> parts, in order
    projects: dict[str, ProjectRecord] = field(default_factory=dict)  # id -> project, in creation order
    api_keys: dict[str, ApiKeyRecord] = field(default_factory=dict)  # id -> key, in creation order
    idempotency: dict[tuple[str, str], IdempotencyKey] = field(default_factory=dict)  # (owner, key) -> row
    endpoints: dict[str, WebhookEndpoint] = field(default_factory=dict)  # id -> endpoint, in creation order
    deliveries: dict[str, list[DeliveryAttempt]] = field(default_factory=dict)  # event id -> its attempts
    load: dict[tuple[str, str], tuple[UpstreamLoad, float]] = field(
        default_factory=dict
    )  # (holder, upstream)
    seq: int = 0


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _lease(sh: _Shard, status: ShardStatus, owner: str | None, until: float | None) -> None:
    """A shard attempt starts (running, leased) or is given back (pending): its progress starts from zero."""
    sh.rec.status = check_shard(Sh(sh.rec.status), status)
    sh.lease_owner, sh.lease_until = owner, until
    sh.rec.completed = sh.rec.failed = sh.expired = 0
    sh.rec.usage = Usage()


def _shard_copy(rec: ShardRecord) -> ShardRecord:
    return replace(rec, usage=replace(rec.usage))


class MemoryStore(MetadataStore):
    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._clock: Callable[[], float] = time.time if clock is None else clock
        self._data = _State()
        self._open = False

    # -- plumbing -------------------------------------------------------------------------------------------
    @property
    def _s(self) -> _State:
        if not self._open:
            raise StoreError("store is not open")
        return self._data

    def _next_seq(self) -> int:
        self._s.seq += 1
        return self._s.seq

    def _batch_out(self, b: _Batch) -> BatchRecord:
        """A copy of the batch with its counts and usage summed over its shards."""
        out = replace(b.rec, metadata=_loads(b.metadata), errors=_loads(b.errors), completed=0, failed=0)
        out.usage = Usage()
        upstream = expired = cancelled = done_failed = 0
        for sh in self._s.shards.get(b.rec.id, {}).values():
            out.completed += sh.rec.completed
            out.failed += sh.rec.failed
            out.usage.add(sh.rec.usage)
            upstream, expired, cancelled = (
                upstream + sh.upstream_failed,
                expired + sh.expired,
                cancelled + sh.cancelled,
            )
            done_failed += sh.rec.failed if sh.rec.status == Sh.DONE else 0
        out.outcomes = Outcomes(upstream, expired, cancelled, done_failed)
        return out

    def _transition(self, b: _Batch, dst: BatchStatus, **fields: Any) -> bool:
        stamp = check_transition(b.rec.status, dst)  # raises before anything changes
        b.rec.status = dst
        if stamp is not None:
            setattr(b.rec, stamp, int(self._clock()))
        for name, value in fields.items():
            setattr(b, name, value)
        if dst in TERMINAL and b.rec.id not in self._s.events:  # the webhook, with the final status
            now = self._clock()
            ev = WebhookEvent(event_id(), b.rec.id, b.rec.owner, webhook_type(dst), int(now))
            self._s.events[b.rec.id] = _Event(self._next_seq(), ev, now)
        return True

    def _holds_job(self, batch_id: str, worker: str) -> _Batch | None:
        b = self._s.batches.get(batch_id)
        return b if b is not None and b.job_owner == worker else None

    def _put_file(self, rec: FileRecord) -> None:
        self._s.files[rec.id] = _File(self._next_seq(), replace(rec))

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def now(self) -> float:
        return self._clock()

    # -- files ----------------------------------------------------------------------------------------------
    async def insert_file(self, rec: FileRecord) -> None:
        if rec.id in self._s.files:  # deleted files keep their id, as the UNIQUE column does
            raise StoreError(f"memory: file {rec.id!r} exists")
        self._put_file(rec)

    async def get_file(self, owner: str | None, file_id: str) -> FileRecord | None:
        f = self._s.files.get(file_id)
        if f is None or f.deleted or (owner is not None and f.rec.owner != owner):
            return None
        return replace(f.rec)

    async def insert_upload(self, rec: UploadRecord) -> None:
        if rec.id in self._s.uploads:
            raise StoreError(f"memory: upload {rec.id!r} exists")
        self._s.uploads[rec.id] = replace(rec)

    async def get_upload(self, owner: str | None, upload_id: str) -> UploadRecord | None:
        u = self._s.uploads.get(upload_id)
        if u is None or (owner is not None and u.owner != owner):
            return None
        return replace(u)

    async def insert_upload_part(self, part: UploadPartRecord) -> None:
        self._s.parts.setdefault(part.upload_id, []).append(replace(part))

    async def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        return [replace(p) for p in self._s.parts.get(upload_id, [])]

    async def expired_uploads(self, limit: int) -> list[UploadRecord]:
        now = int(self._clock())
        hits = [
            u for u in self._s.uploads.values() if u.status == UploadStatus.PENDING and u.expires_at <= now
        ]
        return [replace(u) for u in hits[:limit]]

    async def finish_upload(self, owner: str, upload_id: str, status: str, file: FileRecord | None) -> bool:
        dst = finished_upload(status)
        u = self._s.uploads.get(upload_id)
        if u is None or u.owner != owner or u.status != UploadStatus.PENDING:
            return False
        if file is not None:
            await self.insert_file(file)
            u.file_id = file.id
        u.status = dst
        return True

    async def list_files(
        self, owner: str, *, purpose: str | None, limit: int, order: str, after: str | None
    ) -> Page:
        rows = sorted(self._s.files.values(), key=lambda f: f.seq, reverse=order != "asc")
        if after is not None:
            cur = self._s.files.get(after)  # a deleted file is still a cursor
            if cur is None or cur.rec.owner != owner:
                return Page([], False)
            rows = [f for f in rows if (f.seq > cur.seq if order == "asc" else f.seq < cur.seq)]
        rows = [
            f
            for f in rows
            if f.rec.owner == owner and not f.deleted and (purpose is None or f.rec.purpose == purpose)
        ]
        return Page([replace(f.rec) for f in rows[:limit]], len(rows) > limit)

    async def delete_file(self, owner: str, file_id: str) -> tuple[FileRecord, bool] | None:
        f = self._s.files.get(file_id)
        if f is None or f.deleted or f.rec.owner != owner:
            return None
        f.deleted = True
        live = any(
            b.rec.input_file_id == file_id and b.rec.status in UNFINISHED for b in self._s.batches.values()
        )
        return replace(f.rec), not live

    async def expired_files(self, limit: int) -> list[FileRecord]:
        now = int(self._clock())
        rows = sorted(self._s.files.values(), key=lambda f: f.seq)
        hits = [f for f in rows if not f.deleted and f.rec.expires_at is not None and f.rec.expires_at <= now]
        return [replace(f.rec) for f in hits[:limit]]

    # -- batches --------------------------------------------------------------------------------------------
    async def claim_webhook_events(
        self, worker: str, lease_s: float, limit: int, since: int
    ) -> list[WebhookEvent]:
        now = self._clock()
        due = [
            e
            for e in sorted(self._s.events.values(), key=lambda e: e.seq)
            if e.status == WebhookStatus.PENDING
            and e.next_at <= now
            and e.ev.created_at >= since
            and (e.lease_until is None or e.lease_until < now)
        ][:limit]
        for e in due:
            e.lease_owner, e.lease_until = worker, now + lease_s
        return [replace(e.ev) for e in due]

    async def settle_webhook_event(
        self, event_id: str, worker: str, status: str, next_at: float | None, error: str | None
    ) -> bool:
        dst = settled_webhook(status)
        for e in self._s.events.values():
            if e.ev.id == event_id and e.lease_owner == worker and e.status == WebhookStatus.PENDING:
                e.status, e.last_error = dst, error
                e.next_at = e.next_at if next_at is None else next_at
                e.ev.attempts += 1
                e.lease_owner = e.lease_until = None
                return True
        return False

    # -- webhook endpoints and the delivery log -------------------------------------------------------------
    async def insert_webhook_endpoint(self, rec: WebhookEndpoint) -> None:
        if rec.id in self._s.endpoints:
            raise StoreError(f"memory: webhook endpoint {rec.id!r} exists")
        self._s.endpoints[rec.id] = replace(rec)

    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        e = self._s.endpoints.get(endpoint_id)
        return None if e is None else replace(e)

    async def list_webhook_endpoints(
        self, owner: str | None, *, include_disabled: bool
    ) -> list[WebhookEndpoint]:
        return [
            replace(e)
            for e in self._s.endpoints.values()
            if (owner is None or e.owner == owner) and (include_disabled or e.disabled_at is None)
        ]

    async def rotate_webhook_secret(
        self, endpoint_id: str, secret: str, previous_until: int
    ) -> WebhookEndpoint | None:
        e = self._s.endpoints.get(endpoint_id)
        if e is None or e.disabled_at is not None:
            return None
        e.previous_secret, e.previous_until, e.secret = e.secret, previous_until, secret
        return replace(e)

    async def disable_webhook_endpoint(self, endpoint_id: str, now: int) -> WebhookEndpoint | None:
        e = self._s.endpoints.get(endpoint_id)
        if e is None:
            return None
        e.disabled_at = now if e.disabled_at is None else e.disabled_at
        return replace(e)

    async def webhook_targets(self, ev: WebhookEvent) -> tuple[list[WebhookEndpoint], set[str]]:
        live = [
            replace(e)
            for e in self._s.endpoints.values()
            if e.owner == ev.owner and e.disabled_at is None and e.created_at <= ev.created_at
        ]
        took = {a.endpoint_id for a in self._s.deliveries.get(ev.id, []) if a.took_it}
        return live, took

    async def record_webhook_attempts(self, attempts: Sequence[DeliveryAttempt]) -> None:
        for a in attempts:
            self._s.deliveries.setdefault(a.event_id, []).append(replace(a))

    def _logged(self, e: _Event) -> WebhookEvent:
        return replace(e.ev, status=e.status)

    async def list_webhook_events(self, owner: str, *, limit: int, after: str | None) -> Page:
        mine = sorted((e for e in self._s.events.values() if e.ev.owner == owner), key=lambda e: -e.seq)
        if after is not None:
            at = next((i for i, e in enumerate(mine) if e.ev.id == after), None)
            mine = [] if at is None else mine[at + 1 :]
        return Page([self._logged(e) for e in mine[:limit]], len(mine) > limit)

    async def get_webhook_event(
        self, owner: str, event_id: str
    ) -> tuple[WebhookEvent, list[DeliveryAttempt]] | None:
        for e in self._s.events.values():
            if e.ev.id == event_id and e.ev.owner == owner:
                attempts = self._s.deliveries.get(event_id, [])[:MAX_ATTEMPTS_SHOWN]
                return self._logged(e), [replace(a) for a in attempts]
        return None

    async def insert_batch(self, rec: BatchRecord) -> None:
        if rec.id in self._s.batches:
            raise StoreError(f"memory: batch {rec.id!r} exists")
        kept = BatchRecord(  # the columns the SQL stores insert; the rest start empty
            id=rec.id,
            owner=rec.owner,
            endpoint=rec.endpoint,
            input_file_id=rec.input_file_id,
            completion_window=rec.completion_window,
            status=S(rec.status),
            created_at=rec.created_at,
            expires_at=rec.expires_at,
            output_expires_after=rec.output_expires_after,
        )
        self._s.batches[rec.id] = _Batch(self._next_seq(), kept, metadata=_dumps(rec.metadata))

    async def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        b = self._s.batches.get(batch_id)
        if b is None or (owner is not None and b.rec.owner != owner):
            return None
        return self._batch_out(b)

    async def list_batches(self, owner: str, *, limit: int, after: str | None) -> Page:
        rows = [b for b in self._s.batches.values() if b.rec.owner == owner]
        if after is not None:
            cur = self._s.batches.get(after)
            if cur is None or cur.rec.owner != owner:
                return Page([], False)
            rows = [b for b in rows if b.seq < cur.seq]
        rows.sort(key=lambda b: b.seq, reverse=True)
        return Page([self._batch_out(b) for b in rows[:limit]], len(rows) > limit)

    async def request_cancel(self, owner: str, batch_id: str) -> BatchRecord | None:
        b = self._s.batches.get(batch_id)
        if b is None or b.rec.owner != owner:
            return None
        dst = on(Step.CANCEL, b.rec.status)
        if dst is not None:
            self._transition(b, dst)
        return self._batch_out(b)

    # -- batch-level jobs -----------------------------------------------------------------------------------
    def _claim_job(self, worker: str, lease_s: float, wanted: Callable[[_Batch], bool]) -> BatchJob | None:
        now = self._clock()
        free = (
            b
            for b in sorted(self._s.batches.values(), key=lambda b: b.seq)
            if wanted(b)
            and (b.job_owner is None or (b.job_lease_until is not None and b.job_lease_until < now))
        )
        b = next(free, None)
        if b is None:
            return None
        b.job_owner, b.job_lease_until = worker, now + lease_s
        f = self._s.files.get(b.rec.input_file_id)
        # a deleted file does not exist (its blob may live on for older batches)
        file = replace(f.rec) if f is not None and not f.deleted else None
        return BatchJob(self._batch_out(b), file, now)

    def _all_done(self, b: _Batch) -> bool:
        return all(sh.rec.status == Sh.DONE for sh in self._s.shards.get(b.rec.id, {}).values())

    async def claim_validation(self, worker: str, lease_s: float) -> BatchJob | None:
        return self._claim_job(worker, lease_s, lambda b: not b.planned and b.rec.status in VALIDATABLE)

    async def claim_finalization(self, worker: str, lease_s: float) -> BatchJob | None:
        return self._claim_job(
            worker, lease_s, lambda b: b.planned and b.rec.status in FINALIZABLE and self._all_done(b)
        )

    async def extend_job(self, batch_id: str, worker: str, lease_s: float) -> bool:
        b = self._holds_job(batch_id, worker)
        if b is None:
            return False
        b.job_lease_until = self._clock() + lease_s
        return True

    async def plan_batch(
        self,
        batch_id: str,
        worker: str,
        shards: Sequence[ShardPlan],
        total: int,
        model: str | None,
        admit: Callable[[int], bool] | None = None,
    ) -> bool:
        b = self._holds_job(batch_id, worker)
        dst = None if b is None else on(Step.PLANNED, b.rec.status)
        if b is None or dst is None:
            return False
        if admit is not None and model is not None:  # no await from here on: nothing else runs meanwhile
            enqueued = self._enqueued(b.rec.owner, model)
            if not admit(enqueued):
                raise OverEnqueued(enqueued)
        mine = self._s.shards.get(batch_id, {})
        indexes = [p.index for p in shards]
        if len(set(indexes)) != len(indexes) or any(i in mine for i in indexes):
            raise StoreError(f"memory: shard index planned twice for batch {batch_id!r}")
        if dst != b.rec.status:
            self._transition(b, dst)
        added = {
            p.index: _Shard(
                ShardRecord(batch_id, p.index, p.start, p.end, p.first_line, p.line_count, spans=p.spans)
            )
            for p in shards
        }
        self._s.shards[batch_id] = {**mine, **added}
        b.planned, b.job_owner, b.job_lease_until = True, None, None
        b.rec.total, b.rec.model = total, model
        return True

    async def fail_batch(self, batch_id: str, worker: str, errors: list[dict[str, Any]]) -> bool:
        b = self._holds_job(batch_id, worker)
        dst = None if b is None else on(Step.INVALID, b.rec.status)
        if b is None or dst is None:
            return False
        text = _dumps(errors)
        return self._transition(b, dst, errors=text, planned=True, job_owner=None, job_lease_until=None)

    async def begin_finalizing(self, batch_id: str, worker: str) -> BatchRecord | None:
        b = self._holds_job(batch_id, worker)
        if b is None:
            return None
        dst = on(Step.FINALIZE, b.rec.status)
        if dst is not None and dst != b.rec.status:
            self._transition(b, dst)
        return self._batch_out(b)

    async def done_shards(self, batch_id: str) -> list[ShardRecord]:
        mine = self._s.shards.get(batch_id, {})
        return [_shard_copy(mine[i].rec) for i in sorted(mine) if mine[i].rec.status == Sh.DONE]

    async def batch_expired_lines(self, batch_id: str) -> int:
        return sum(sh.expired for sh in self._s.shards.get(batch_id, {}).values())

    async def finish_batch(
        self,
        batch_id: str,
        worker: str,
        status: BatchStatus,
        output_file: FileRecord | None,
        error_file: FileRecord | None,
    ) -> bool:
        b = self._holds_job(batch_id, worker)
        if b is None:
            return False
        check_transition(b.rec.status, status)  # nothing is written when the transition is illegal
        for f in (output_file, error_file):
            if f is not None:  # INSERT OR REPLACE: the old row goes, a new one (new seq, not deleted) comes
                self._s.files.pop(f.id, None)
                self._put_file(f)
        b.rec.output_file_id = None if output_file is None else output_file.id
        b.rec.error_file_id = None if error_file is None else error_file.id
        return self._transition(b, status, job_owner=None, job_lease_until=None)

    # -- shards ---------------------------------------------------------------------------------------------
    def _pick_shard(self, now: float, not_owners: Collection[str] = ()) -> tuple[_Batch, _Shard] | None:
        """In `sql.claim_order`'s order: cancelling batches first (they only drain), then the owner with the fewest
        running shards per unit of weight, then the batch with the fewest running shards, the earliest deadline,
        the oldest, then the lowest shard index."""
        load: dict[str, int] = {}
        for b in self._s.batches.values():
            running = sum(sh.leased(now) for sh in self._s.shards.get(b.rec.id, {}).values())
            load[b.rec.owner] = load.get(b.rec.owner, 0) + running
        best: tuple[tuple[bool, float, int, int, int], _Batch, _Shard] | None = None
        for b in self._s.batches.values():
            if b.rec.status not in ACTIVE or b.rec.input_file_id not in self._s.files:
                continue
            if b.rec.owner in not_owners:
                continue
            mine = self._s.shards.get(b.rec.id, {}).values()
            free = [sh for sh in mine if sh.claimable(now)]
            if free:
                share = load[b.rec.owner] / self._weight(b.rec.owner)
                running = sum(sh.leased(now) for sh in mine)
                key = (b.rec.status != S.CANCELLING, share, running, b.rec.expires_at, b.seq)
                if best is None or key < best[0]:
                    best = (key, b, min(free, key=lambda sh: sh.rec.index))
        return None if best is None else (best[1], best[2])

    def _weight(self, owner: str) -> float:
        p = self._s.projects.get(owner)
        return 1.0 if p is None or p.weight == 0 else p.weight

    async def claim_shard(
        self, worker: str, lease_s: float, *, not_owners: Collection[str] = ()
    ) -> ShardClaim | None:
        now = self._clock()
        picked = self._pick_shard(now, not_owners)
        if picked is None:
            return None
        b, sh = picked
        shard = _shard_copy(sh.rec)  # as read before the reset, like the SQL stores' claim row
        attempt = sh.rec.attempt + 1
        shard.status, shard.attempt = Sh.RUNNING, attempt
        sh.rec.attempt = attempt
        _lease(sh, Sh.RUNNING, worker, now + lease_s)
        sh.started_at = now
        return ShardClaim(
            shard=shard,
            attempt=attempt,
            worker=worker,
            batch_status=b.rec.status,
            endpoint=b.rec.endpoint,
            expires_at=b.rec.expires_at,
            input_blob_key=self._s.files[b.rec.input_file_id].rec.blob_key,
            db_now=now,
            owner=b.rec.owner,
            weight=self._weight(b.rec.owner),
        )

    def _fenced(self, claim: ShardClaim) -> _Shard | None:
        """The claimed shard, if this attempt still holds it."""
        sh = self._s.shards.get(claim.shard.batch_id, {}).get(claim.shard.index)
        if sh is None or sh.rec.status != Sh.RUNNING:
            return None
        if sh.rec.attempt != claim.attempt or sh.lease_owner != claim.worker:
            return None
        return sh

    async def heartbeat_shard(
        self, claim: ShardClaim, lease_s: float, completed: int, failed: int, usage: Usage
    ) -> Heartbeat | None:
        now = self._clock()
        sh = self._fenced(claim)
        if sh is None:
            return None
        sh.lease_until = now + lease_s
        sh.rec.completed, sh.rec.failed, sh.rec.usage = completed, failed, replace(usage)
        b = self._s.batches[claim.shard.batch_id]
        return Heartbeat(b.rec.status, b.rec.expires_at, now)

    async def release_shard(
        self, claim: ShardClaim, *, retry_in: float = 0.0, failure: str | None = None
    ) -> None:
        sh = self._fenced(claim)
        if sh is not None:  # the attempt's progress goes with it
            _lease(sh, Sh.PENDING, None, None)
            sh.retry_at = self._clock() + retry_in if retry_in > 0 else None
            if failure is not None:
                sh.rec.failures += 1
                sh.rec.last_error = failure

    async def release_worker(self, worker: str) -> int:
        n = 0
        for mine in self._s.shards.values():
            for sh in mine.values():
                if sh.rec.status == Sh.RUNNING and sh.lease_owner == worker:
                    _lease(sh, Sh.PENDING, None, None)
                    sh.rec.failures += 1
                    sh.rec.last_error = "the worker process running it died"
                    n += 1
        for b in self._s.batches.values():
            if b.job_owner == worker:
                b.job_owner, b.job_lease_until = None, None
        return n

    async def release_all(self) -> None:
        """Give back every lease (only for a single-process owner of this store, as `SQLiteStore.release_all`)."""
        for mine in self._s.shards.values():
            for sh in mine.values():
                if sh.rec.status == Sh.RUNNING:
                    sh.rec.status = check_shard(Sh.RUNNING, Sh.PENDING)
                    sh.lease_owner, sh.lease_until = None, None
        for b in self._s.batches.values():
            b.job_owner, b.job_lease_until = None, None

    async def release_job(self, batch_id: str, worker: str) -> None:
        b = self._holds_job(batch_id, worker)
        if b is not None:
            b.job_owner, b.job_lease_until = None, None

    async def complete_shard(self, claim: ShardClaim, result: ShardResult, expired: int) -> bool:
        sh = self._fenced(claim)
        if sh is None:
            return False
        sh.rec.status = check_shard(Sh.RUNNING, Sh.DONE)
        sh.lease_owner, sh.lease_until = None, None
        sh.rec.completed, sh.rec.failed, sh.expired = result.completed, result.failed, expired
        sh.cancelled, sh.upstream_failed = result.cancelled, result.upstream_failed
        sh.rec.usage = replace(result.usage)
        sh.rec.out_key, sh.rec.err_key = result.out_key, result.err_key
        sh.done_at = self._clock()
        return True

    # per-key usage (caps)
    async def owner_usage(self, owner: str) -> OwnerUsage:
        now = int(self._clock())
        live = [
            f.rec
            for f in self._s.files.values()
            if f.rec.owner == owner and not f.deleted and (f.rec.expires_at is None or f.rec.expires_at > now)
        ]
        return OwnerUsage(
            files=len(live),
            stored_bytes=sum(f.bytes for f in live),
            pending_uploads=sum(
                1
                for u in self._s.uploads.values()
                if u.owner == owner and u.status_at(now) == UploadStatus.PENDING
            ),
            active_batches=sum(
                1 for b in self._s.batches.values() if b.rec.owner == owner and b.rec.status not in TERMINAL
            ),
        )

    async def admission_load(self, window_s: float) -> AdmissionLoad:
        now = self._clock()
        since = now - window_s
        recent = [
            (batch_id, sh)
            for batch_id, shards in self._s.shards.items()
            for sh in shards.values()
            if sh.done_at is not None and sh.done_at >= since
        ]
        done = sum(sh.rec.completed + sh.rec.failed - sh.expired - sh.cancelled for _, sh in recent)
        starts = [sh.started_at for _, sh in recent if sh.started_at is not None]
        measured = {batch_id for batch_id, _ in recent}
        batches = [
            b.rec
            for b in self._s.batches.values()
            if b.planned and b.rec.total > 0 and (b.rec.status in ACTIVE or b.rec.id in measured)
        ]
        by_owner: dict[str, int] = {}
        for batch_id, shards in self._s.shards.items():
            b = self._s.batches[batch_id].rec
            if b.status in UNFINISHED:
                left = sum(
                    sh.rec.line_count - sh.rec.completed - sh.rec.failed
                    for sh in shards.values()
                    if sh.rec.status != Sh.DONE
                )
                by_owner[b.owner] = by_owner.get(b.owner, 0) + left
        waiting = tuple((o, n, self._weight(o)) for o, n in sorted(by_owner.items()) if n)
        return AdmissionLoad(
            now,
            (await self.batch_stats()).lines_waiting,
            done,
            min(starts) if starts else None,
            sum(
                self._s.files[b.input_file_id].rec.bytes for b in batches if b.input_file_id in self._s.files
            ),
            sum(b.total for b in batches),
            waiting,
        )

    async def batch_stats(self) -> BatchStats:
        counts: dict[BatchStatus, int] = {}
        for b in self._s.batches.values():
            counts[b.rec.status] = counts.get(b.rec.status, 0) + 1
        waiting = sum(
            sh.rec.line_count - sh.rec.completed - sh.rec.failed
            for batch_id, shards in self._s.shards.items()
            if self._s.batches[batch_id].rec.status in UNFINISHED
            for sh in shards.values()
            if sh.rec.status != Sh.DONE
        )
        return BatchStats(counts, waiting)

    # blob lifecycle (sweeper)
    async def removable_deleted_files(self, limit: int) -> list[FileRecord]:
        read = {b.rec.input_file_id for b in self._s.batches.values() if b.rec.status in UNFINISHED}
        hits = [
            f for f in self._s.files.values() if f.deleted and not f.blob_removed and f.rec.id not in read
        ]
        return [replace(f.rec) for f in sorted(hits, key=lambda f: f.seq)[:limit]]

    async def forget_file_blob(self, file_id: str) -> None:
        f = self._s.files.get(file_id)
        if f is not None and f.deleted:
            f.blob_removed = True

    async def needed_blob_keys(self, keys: Sequence[str]) -> set[str]:
        files = {f.rec.blob_key for f in self._s.files.values() if not f.blob_removed}
        parts = {
            p.blob_key
            for upload_id, ps in self._s.parts.items()
            if (u := self._s.uploads.get(upload_id)) is not None and u.status == UploadStatus.PENDING
            for p in ps
        }
        return {k for k in keys if k in files or k in parts}

    async def batches_done_with(self, batch_ids: Sequence[str]) -> set[str]:
        return {
            i for i in batch_ids if (b := self._s.batches.get(i)) is None or b.rec.status not in UNFINISHED
        }

    # -- projects and API keys ------------------------------------------------------------------------------
    async def insert_project(self, rec: ProjectRecord) -> bool:
        if any(p.name == rec.name for p in self._s.projects.values()):
            return False
        self._s.projects[rec.id] = replace(rec)
        return True

    async def get_project(self, project_id: str) -> ProjectRecord | None:
        p = self._s.projects.get(project_id)
        return None if p is None else replace(p)

    async def project_by_name(self, name: str) -> ProjectRecord | None:
        return next((replace(p) for p in self._s.projects.values() if p.name == name), None)

    async def list_projects(self, *, limit: int, after: str | None, include_archived: bool) -> Page:
        items = _after(list(self._s.projects.values()), after)
        items = [p for p in items if include_archived or not p.archived]
        return Page([replace(p) for p in items[:limit]], len(items) > limit)

    async def archive_project(self, project_id: str, now: int) -> ProjectRecord | None:
        p = self._s.projects.get(project_id)
        if p is None:
            return None
        if p.archived_at is None:
            p.archived_at = now
        return replace(p)

    async def set_project_weight(self, project_id: str, weight: float) -> ProjectRecord | None:
        p = self._s.projects.get(project_id)
        if p is None:
            return None
        p.weight = weight
        return replace(p)

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        if rec.project_id not in self._s.projects:
            raise StoreError(f"memory: no project {rec.project_id}")
        if rec.id in self._s.api_keys or any(k.key_hash == rec.key_hash for k in self._s.api_keys.values()):
            raise StoreError("memory: duplicate key")
        self._s.api_keys[rec.id] = replace(rec)

    async def key_holder(self, key_hash: str) -> KeyHolder | None:
        for k in self._s.api_keys.values():
            if k.key_hash == key_hash:
                return KeyHolder(replace(k), replace(self._s.projects[k.project_id]))
        return None

    async def list_api_keys(self, project_id: str | None, *, limit: int, after: str | None) -> Page:
        items = _after(list(self._s.api_keys.values()), after)
        items = [k for k in items if project_id is None or k.project_id == project_id]
        return Page([replace(k) for k in items[:limit]], len(items) > limit)

    async def revoke_api_key(self, key_id: str, now: int) -> ApiKeyRecord | None:
        k = self._s.api_keys.get(key_id)
        if k is None:
            return None
        if k.revoked_at is None:
            k.revoked_at = now
        return replace(k)

    async def has_api_keys(self) -> bool:
        return bool(self._s.api_keys)

    async def enqueued_input_bytes(self, owner: str, model: str) -> int:
        return self._enqueued(owner, model)

    def _enqueued(self, owner: str, model: str) -> int:
        return sum(
            self._s.files[b.rec.input_file_id].rec.bytes
            for b in self._s.batches.values()
            if b.rec.owner == owner
            and b.rec.model == model
            and b.planned
            and b.rec.status in ACTIVE
            and b.rec.input_file_id in self._s.files
        )

    async def delete_batch(self, owner: str, batch_id: str) -> BatchRecord | None:
        b = self._s.batches.get(batch_id)
        if b is None or b.rec.owner != owner:
            return None
        out = self._batch_out(b)
        if b.rec.status in TERMINAL:
            del self._s.batches[batch_id]
            self._s.shards.pop(batch_id, None)
        return out

    # -- idempotency keys -----------------------------------------------------------------------------------
    async def claim_idempotency_key(self, rec: IdempotencyKey, live_since: int) -> IdempotencyKey:
        for k in [k for k, v in self._s.idempotency.items() if v.created_at < live_since][:16]:
            del self._s.idempotency[k]
        held = self._s.idempotency.get((rec.owner, rec.key))
        if held is None or held.created_at < live_since:
            self._s.idempotency[(rec.owner, rec.key)] = held = rec
        return held

    async def drop_idempotency_key(self, owner: str, key: str, object_id: str) -> None:
        held = self._s.idempotency.get((owner, key))
        if held is not None and held.object_id == object_id:
            del self._s.idempotency[(owner, key)]

    # -- upstream load across machines ----------------------------------------------------------------------
    async def exchange_load(
        self, holder: str, machine: str, loads: Sequence[tuple[str, int, int]], ttl_s: float
    ) -> list[UpstreamLoad]:
        now = self._clock()
        rows = self._s.load
        for k in [k for k, (_, until) in rows.items() if until < now]:
            del rows[k]
        for upstream, demand, in_flight in loads:
            rows[(holder, upstream)] = (UpstreamLoad(machine, upstream, demand, in_flight), now + ttl_s)
        return sorted(
            (row for (h, _), (row, _) in rows.items() if h != holder), key=lambda r: (r.machine, r.upstream)
        )


def _after(items: list[Any], after: str | None) -> list[Any]:
    """The items after the one whose id is `after` (none when it is unknown), in order."""
    if after is None:
        return items
    ids = [i.id for i in items]
    return items[ids.index(after) + 1 :] if after in ids else []
