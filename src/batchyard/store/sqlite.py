"""SQLite MetadataStore (the single-machine default): WAL, one connection owned by one thread.

Every call runs on a dedicated thread, so the event loop never blocks on the database and writes are serialized.
Write transactions use BEGIN IMMEDIATE so that several processes sharing one file (a server and a one-shot `run`)
serialize instead of failing. Leases use this machine's clock, which is the database's clock.

Durability: WAL with `synchronous=FULL`, so every commit (a shard's fenced commit, a status change, a file row) is
on disk when the call returns. With NORMAL, WAL commits survive a process crash but the last ones may be lost on a
power loss or kernel crash: a batch answered `completed` (and its webhook event) could come back `in_progress`, and
a file row could vanish while its blob (fsynced by the blob store) stays. FULL costs one fsync of the WAL per commit;
measured on a shard commit loop (`python bench/sqlite_sync.py --dir <the disk>`: claim + complete, 300 shards):
281/294 -> 248/252 commits/s (~0.5 ms more per commit) on this VM's disk, 2026-12-01. A shard holds hundreds to thousands of lines, so at ~18,000 lines/s
that is well under 1 % of the worker's time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

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
from batchyard.domain.planning import ShardPlan, pack_spans
from batchyard.domain.states import (
    TERMINAL,
    UNFINISHED,
    BatchStatus,
    ShardStatus,
    Step,
    UploadStatus,
    WebhookStatus,
    check_transition,
    finished_upload,
    on,
    settled_webhook,
    webhook_type,
)
from batchyard.domain.tenancy import ApiKeyRecord, KeyHolder, ProjectRecord
from batchyard.domain.webhooks import DeliveryAttempt, WebhookEndpoint
from batchyard.errors import StoreError
from batchyard.ids import event_id
from batchyard.store import sql
from batchyard.store import tenancy_sql as tq
from batchyard.store import webhooks_sql as wq
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
from batchyard.store.rows import (
    BATCH_COLS,
    EVENT_COLS,
    FILE_COLS,
    PART_COLS,
    RELEASED,
    SHARD_FIELDS,
    UPLOAD_COLS,
    batch_from_row,
    batch_values,
    claim_from_row,
    event_from_row,
    fence,
    file_from_row,
    file_values,
    part_from_row,
    part_values,
    prefixed,
    shard_from_row,
    upload_from_row,
    upload_values,
    usage_values,
)

T = TypeVar("T")
S = BatchStatus

_REPLACE_FILE = sql.INSERT_FILE.replace("INSERT", "INSERT OR REPLACE", 1)
_UNFINISHED = sql.in_list(UNFINISHED)
_COUNTS = (
    "SELECT COALESCE(SUM(completed),0), COALESCE(SUM(failed),0), COALESCE(SUM(input_tokens),0), "
    "COALESCE(SUM(cached_tokens),0), COALESCE(SUM(output_tokens),0), COALESCE(SUM(reasoning_tokens),0), "
    "COALESCE(SUM(upstream_failed),0), COALESCE(SUM(expired),0), COALESCE(SUM(cancelled),0), "
    f"COALESCE(SUM(CASE WHEN status = '{ShardStatus.DONE}' THEN failed ELSE 0 END),0) "
    "FROM shards WHERE batch_id = ?"
)


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations, in order."""
    return sql.migrations("sqlite")


def _statements(sql: str) -> list[str]:
    """The statements of a migration script, split where SQLite says a statement is complete (a `;` inside a
    comment or a string literal does not end one)."""
    out: list[str] = []
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                out.append(pending.strip())
            pending = ""
    if pending.strip():  # a last statement without its `;` (a trailing comment alone executes as nothing)
        out.append(pending.strip())
    return out


class SQLiteStore(MetadataStore):
    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = str(path)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

    # -- plumbing -------------------------------------------------------------------------------------------
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise StoreError("store is not open")
        try:
            return fn(self._db)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    @contextmanager
    def _tx(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        # Switching a new database to WAL needs it alone; processes opening it together may see "locked" at
        # once (the busy handler does not cover it), so try again for a while.
        for attempt in range(200):
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 199:
                    raise
                time.sleep(0.05)
        db.execute("PRAGMA synchronous=FULL")  # every commit survives a power loss: see the module docstring
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        self._db = db
        # A database already at the current schema is opened with reads alone: a write transaction would wait
        # for any other process holding the write lock (say, a worker stopped by SIGSTOP mid-commit), and an API
        # replica could not start, or serve reads, until it let go.
        if self._pending_migrations(db):
            with self._tx(db):
                db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
                # again, under the lock: another process may have run them meanwhile
                for version, sql in self._pending_migrations(db):
                    for stmt in _statements(sql):
                        db.execute(stmt)
                    db.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))

    @staticmethod
    def _pending_migrations(db: sqlite3.Connection) -> list[tuple[int, str]]:
        found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
        if found.fetchone() is None:
            return migrations()
        done = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
        return [(version, sql) for version, sql in migrations() if version not in done]

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._open)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    async def close(self) -> None:
        def _close(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(_close)
            self._db = None
        self._pool.shutdown(wait=True)

    async def now(self) -> float:
        return self._clock()

    # -- files ----------------------------------------------------------------------------------------------
    async def insert_file(self, rec: FileRecord) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(sql.INSERT_FILE, file_values(rec))

        await self._run(q)

    async def get_file(self, owner: str | None, file_id: str) -> FileRecord | None:
        def q(db: sqlite3.Connection) -> FileRecord | None:
            row = db.execute(sql.GET_FILE, (file_id,)).fetchone()
            if row is None or (owner is not None and row["owner"] != owner):
                return None
            return file_from_row(row)

        return await self._run(q)

    async def insert_upload(self, rec: UploadRecord) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(sql.INSERT_UPLOAD, upload_values(rec))

        await self._run(q)

    async def get_upload(self, owner: str | None, upload_id: str) -> UploadRecord | None:
        def q(db: sqlite3.Connection) -> UploadRecord | None:
            row = db.execute(sql.GET_UPLOAD, (upload_id,)).fetchone()
            if row is None or (owner is not None and row["owner"] != owner):
                return None
            return upload_from_row(row)

        return await self._run(q)

    async def insert_upload_part(self, part: UploadPartRecord) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(sql.INSERT_PART, part_values(part))

        await self._run(q)

    async def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        def q(db: sqlite3.Connection) -> list[UploadPartRecord]:
            rows = db.execute(
                f"SELECT {PART_COLS} FROM upload_parts WHERE upload_id = ? ORDER BY rowid", (upload_id,)
            ).fetchall()
            return [part_from_row(r) for r in rows]

        return await self._run(q)

    async def expired_uploads(self, limit: int) -> list[UploadRecord]:
        now = int(self._clock())

        def q(db: sqlite3.Connection) -> list[UploadRecord]:
            rows = db.execute(
                f"SELECT {UPLOAD_COLS} FROM uploads WHERE status = '{UploadStatus.PENDING}' AND expires_at <= ? "
                "LIMIT ?",
                (now, limit),
            ).fetchall()
            return [upload_from_row(r) for r in rows]

        return await self._run(q)

    async def finish_upload(self, owner: str, upload_id: str, status: str, file: FileRecord | None) -> bool:
        dst = str(finished_upload(status))

        def q(db: sqlite3.Connection) -> bool:
            with self._tx(db):
                cur = db.execute(sql.FINISH_UPLOAD, (dst, file.id if file else None, upload_id, owner))
                if cur.rowcount != 1:
                    return False
                if file is not None:
                    db.execute(sql.INSERT_FILE, file_values(file))
                return True

        return await self._run(q)

    async def list_files(
        self, owner: str, *, purpose: str | None, limit: int, order: str, after: str | None
    ) -> Page:
        def q(db: sqlite3.Connection) -> Page:
            where, args = ["owner = ?", "deleted = 0"], [owner]
            if purpose is not None:
                where.append("purpose = ?")
                args.append(purpose)
            if after is not None:
                cur = db.execute(
                    "SELECT seq FROM files WHERE id = ? AND owner = ?", (after, owner)
                ).fetchone()
                if cur is None:
                    return Page([], False)
                where.append("seq > ?" if order == "asc" else "seq < ?")
                args.append(cur[0])
            direction = "ASC" if order == "asc" else "DESC"
            rows = db.execute(
                f"SELECT {FILE_COLS} FROM files WHERE {' AND '.join(where)} ORDER BY seq {direction} LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
            return Page([file_from_row(r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(q)

    async def delete_file(self, owner: str, file_id: str) -> tuple[FileRecord, bool] | None:
        def q(db: sqlite3.Connection) -> tuple[FileRecord, bool] | None:
            with self._tx(db):
                row = db.execute(
                    f"SELECT {FILE_COLS} FROM files WHERE id = ? AND owner = ? AND deleted = 0",
                    (file_id, owner),
                ).fetchone()
                if row is None:
                    return None
                db.execute(sql.MARK_FILE_DELETED, (file_id,))
                live = db.execute(sql.FILE_IN_USE, (file_id,)).fetchone()
                return file_from_row(row), live is None

        return await self._run(q)

    async def expired_files(self, limit: int) -> list[FileRecord]:
        now = int(self._clock())

        def q(db: sqlite3.Connection) -> list[FileRecord]:
            rows = db.execute(
                f"SELECT {FILE_COLS} FROM files WHERE deleted = 0 AND expires_at IS NOT NULL AND expires_at <= ? "
                "LIMIT ?",
                (now, limit),
            ).fetchall()
            return [file_from_row(r) for r in rows]

        return await self._run(q)

    # -- batches --------------------------------------------------------------------------------------------
    def _batch(self, db: sqlite3.Connection, row: sqlite3.Row) -> BatchRecord:
        c = db.execute(_COUNTS, (row["id"],)).fetchone()
        return batch_from_row(row, c[0], c[1], Usage(c[2], c[3], c[4], c[5]), Outcomes(*c[6:10]))

    def _get_batch(self, db: sqlite3.Connection, batch_id: str) -> BatchRecord | None:
        row = db.execute(f"SELECT {BATCH_COLS} FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else self._batch(db, row)

    def _transition(
        self, db: sqlite3.Connection, batch_id: str, src: BatchStatus, dst: BatchStatus, **fields: Any
    ) -> bool:
        stamp = check_transition(src, dst)
        sets: dict[str, Any] = {"status": str(dst), **fields}
        if stamp is not None:
            sets[stamp] = int(self._clock())
        cols = ", ".join(f"{k} = ?" for k in sets)
        cur = db.execute(
            f"UPDATE batches SET {cols} WHERE id = ? AND status = ?", (*sets.values(), batch_id, str(src))
        )
        if cur.rowcount != 1:
            return False
        if dst in TERMINAL:  # the webhook, in the same transaction as the final status
            now = self._clock()
            db.execute(
                "INSERT OR IGNORE INTO webhook_events (id, batch_id, owner, type, created_at, next_at) "
                "SELECT ?, id, owner, ?, ?, ? FROM batches WHERE id = ?",
                (event_id(), webhook_type(dst), int(now), now, batch_id),
            )
        return True

    async def claim_webhook_events(
        self, worker: str, lease_s: float, limit: int, since: int
    ) -> list[WebhookEvent]:
        def q(db: sqlite3.Connection) -> list[WebhookEvent]:
            now = self._clock()
            with self._tx(db):
                rows = db.execute(
                    f"SELECT {EVENT_COLS} FROM webhook_events WHERE status = '{WebhookStatus.PENDING}' "
                    "AND next_at <= ? "
                    "AND created_at >= ? AND (lease_until IS NULL OR lease_until < ?) ORDER BY seq LIMIT ?",
                    (now, since, now, limit),
                ).fetchall()
                for r in rows:
                    db.execute(
                        "UPDATE webhook_events SET lease_owner = ?, lease_until = ? WHERE id = ?",
                        (worker, now + lease_s, r["id"]),
                    )
                return [event_from_row(r) for r in rows]

        return await self._run(q)

    async def settle_webhook_event(
        self, event_id: str, worker: str, status: str, next_at: float | None, error: str | None
    ) -> bool:
        dst = str(settled_webhook(status))

        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(sql.SETTLE_EVENT, (dst, next_at, error, event_id, worker))
            return cur.rowcount == 1

        return await self._run(q)

    # -- webhook endpoints and the delivery log -------------------------------------------------------------
    async def insert_webhook_endpoint(self, rec: WebhookEndpoint) -> None:
        await self._run(lambda db: db.execute(wq.INSERT_ENDPOINT, wq.endpoint_values(rec)))

    def _endpoint(self, db: sqlite3.Connection, endpoint_id: str) -> WebhookEndpoint | None:
        row = db.execute(wq.GET_ENDPOINT, (endpoint_id,)).fetchone()
        return None if row is None else wq.endpoint_from_row(row)

    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        return await self._run(lambda db: self._endpoint(db, endpoint_id))

    async def list_webhook_endpoints(
        self, owner: str | None, *, include_disabled: bool
    ) -> list[WebhookEndpoint]:
        statement = wq.list_endpoints(owner is not None, include_disabled)
        args = [a for a in (owner,) if a is not None]

        def q(db: sqlite3.Connection) -> list[WebhookEndpoint]:
            return [wq.endpoint_from_row(r) for r in db.execute(statement, args).fetchall()]

        return await self._run(q)

    async def rotate_webhook_secret(
        self, endpoint_id: str, secret: str, previous_until: int
    ) -> WebhookEndpoint | None:
        def q(db: sqlite3.Connection) -> WebhookEndpoint | None:
            with self._tx(db):
                if db.execute(wq.ROTATE_SECRET, (previous_until, secret, endpoint_id)).rowcount != 1:
                    return None
                return self._endpoint(db, endpoint_id)

        return await self._run(q)

    async def disable_webhook_endpoint(self, endpoint_id: str, now: int) -> WebhookEndpoint | None:
        def q(db: sqlite3.Connection) -> WebhookEndpoint | None:
            with self._tx(db):
                db.execute(wq.DISABLE_ENDPOINT, (now, endpoint_id))
                return self._endpoint(db, endpoint_id)

        return await self._run(q)

    async def webhook_targets(self, ev: WebhookEvent) -> tuple[list[WebhookEndpoint], set[str]]:
        def q(db: sqlite3.Connection) -> tuple[list[WebhookEndpoint], set[str]]:
            rows = db.execute(wq.TARGET_ENDPOINTS, (ev.owner, ev.created_at)).fetchall()
            took = {r[0] for r in db.execute(wq.TOOK_IT, (ev.id,)).fetchall()}
            return [wq.endpoint_from_row(r) for r in rows], took

        return await self._run(q)

    async def record_webhook_attempts(self, attempts: Sequence[DeliveryAttempt]) -> None:
        rows = [wq.attempt_values(a) for a in attempts]

        def q(db: sqlite3.Connection) -> None:
            with self._tx(db):
                db.executemany(wq.INSERT_ATTEMPT, rows)

        await self._run(q)

    async def list_webhook_events(self, owner: str, *, limit: int, after: str | None) -> Page:
        statement = wq.list_events(after is not None)
        args = [owner, *((after, owner) if after is not None else ()), limit + 1]

        def q(db: sqlite3.Connection) -> Page:
            rows = db.execute(statement, args).fetchall()
            return Page([event_from_row(r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(q)

    async def get_webhook_event(
        self, owner: str, event_id: str
    ) -> tuple[WebhookEvent, list[DeliveryAttempt]] | None:
        def q(db: sqlite3.Connection) -> tuple[WebhookEvent, list[DeliveryAttempt]] | None:
            row = db.execute(wq.GET_EVENT, (event_id, owner)).fetchone()
            if row is None:
                return None
            attempts = db.execute(wq.ATTEMPTS_OF, (event_id,)).fetchall()
            return event_from_row(row), [wq.attempt_from_row(a) for a in attempts]

        return await self._run(q)

    async def insert_batch(self, rec: BatchRecord) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(sql.INSERT_BATCH, batch_values(rec))

        await self._run(q)

    async def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        def q(db: sqlite3.Connection) -> BatchRecord | None:
            b = self._get_batch(db, batch_id)
            if b is None or (owner is not None and b.owner != owner):
                return None
            return b

        return await self._run(q)

    async def list_batches(self, owner: str, *, limit: int, after: str | None) -> Page:
        def q(db: sqlite3.Connection) -> Page:
            where, args = "owner = ?", [owner]
            if after is not None:
                cur = db.execute(
                    "SELECT seq FROM batches WHERE id = ? AND owner = ?", (after, owner)
                ).fetchone()
                if cur is None:
                    return Page([], False)
                where += " AND seq < ?"
                args.append(cur[0])
            rows = db.execute(
                f"SELECT {BATCH_COLS} FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
            return Page([self._batch(db, r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(q)

    async def request_cancel(self, owner: str, batch_id: str) -> BatchRecord | None:
        def q(db: sqlite3.Connection) -> BatchRecord | None:
            with self._tx(db):
                b = self._get_batch(db, batch_id)
                if b is None or b.owner != owner:
                    return None
                dst = on(Step.CANCEL, b.status)
                if dst is None:
                    return b
                self._transition(db, batch_id, b.status, dst)
                return self._get_batch(db, batch_id)

        return await self._run(q)

    # -- batch-level jobs -----------------------------------------------------------------------------------
    def _claim_job(self, db: sqlite3.Connection, worker: str, lease_s: float, where: str) -> BatchJob | None:
        now = self._clock()
        with self._tx(db):
            row = db.execute(
                f"SELECT {BATCH_COLS} FROM batches b WHERE ({where}) "
                "AND (job_owner IS NULL OR job_lease_until < ?) ORDER BY seq LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE batches SET job_owner = ?, job_lease_until = ? WHERE id = ?",
                (worker, now + lease_s, row["id"]),
            )
            batch = self._batch(db, row)
            frow = db.execute(sql.GET_FILE, (batch.input_file_id,)).fetchone()
            return BatchJob(batch, None if frow is None else file_from_row(frow), now)

    async def claim_validation(self, worker: str, lease_s: float) -> BatchJob | None:
        return await self._run(lambda db: self._claim_job(db, worker, lease_s, sql.NEEDS_VALIDATION))

    async def claim_finalization(self, worker: str, lease_s: float) -> BatchJob | None:
        return await self._run(lambda db: self._claim_job(db, worker, lease_s, sql.NEEDS_FINALIZATION))

    def _holds_job(self, db: sqlite3.Connection, batch_id: str, worker: str) -> BatchRecord | None:
        row = db.execute(
            f"SELECT {BATCH_COLS} FROM batches WHERE id = ? AND job_owner = ?", (batch_id, worker)
        ).fetchone()
        return None if row is None else self._batch(db, row)

    async def extend_job(self, batch_id: str, worker: str, lease_s: float) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE batches SET job_lease_until = ? WHERE id = ? AND job_owner = ?",
                (self._clock() + lease_s, batch_id, worker),
            )
            return cur.rowcount == 1

        return await self._run(q)

    async def plan_batch(
        self,
        batch_id: str,
        worker: str,
        shards: Sequence[ShardPlan],
        total: int,
        model: str | None,
        admit: Callable[[int], bool] | None = None,
    ) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            with self._tx(
                db
            ):  # BEGIN IMMEDIATE: one writer at a time, so the sum below stays true until COMMIT
                b = self._holds_job(db, batch_id, worker)
                dst = None if b is None else on(Step.PLANNED, b.status)
                if b is None or dst is None:
                    return False
                if admit is not None and model is not None:
                    enqueued = int(db.execute(tq.ENQUEUED_BYTES, (b.owner, model)).fetchone()[0])
                    if not admit(enqueued):
                        raise OverEnqueued(enqueued)
                db.executemany(
                    "INSERT INTO shards (batch_id, idx, start_off, end_off, first_line, line_count, spans) "
                    "VALUES (?,?,?,?,?,?,?)",
                    [
                        (batch_id, p.index, p.start, p.end, p.first_line, p.line_count, pack_spans(p.spans))
                        for p in shards
                    ],
                )
                db.execute(sql.PLANNED, (total, model, batch_id))
                if dst != b.status:
                    self._transition(db, batch_id, b.status, dst)
                return True

        return await self._run(q)

    async def fail_batch(self, batch_id: str, worker: str, errors: list[dict[str, Any]]) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            with self._tx(db):
                b = self._holds_job(db, batch_id, worker)
                dst = None if b is None else on(Step.INVALID, b.status)
                if b is None or dst is None:
                    return False
                fields = {
                    "errors": json.dumps(errors),
                    "planned": 1,
                    "job_owner": None,
                    "job_lease_until": None,
                }
                return self._transition(db, batch_id, b.status, dst, **fields)

        return await self._run(q)

    async def begin_finalizing(self, batch_id: str, worker: str) -> BatchRecord | None:
        def q(db: sqlite3.Connection) -> BatchRecord | None:
            with self._tx(db):
                b = self._holds_job(db, batch_id, worker)
                if b is None:
                    return None
                dst = on(Step.FINALIZE, b.status)
                if dst is not None and dst != b.status:
                    self._transition(db, batch_id, b.status, dst)
                return self._get_batch(db, batch_id)

        return await self._run(q)

    async def done_shards(self, batch_id: str) -> list[ShardRecord]:
        def q(db: sqlite3.Connection) -> list[ShardRecord]:
            rows = db.execute(sql.DONE_SHARDS, (batch_id,)).fetchall()
            return [shard_from_row(r) for r in rows]

        return await self._run(q)

    async def batch_expired_lines(self, batch_id: str) -> int:
        def q(db: sqlite3.Connection) -> int:
            row = db.execute(sql.EXPIRED_LINES, (batch_id,)).fetchone()
            return int(row[0])

        return await self._run(q)

    async def finish_batch(
        self,
        batch_id: str,
        worker: str,
        status: BatchStatus,
        output_file: FileRecord | None,
        error_file: FileRecord | None,
    ) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            with self._tx(db):
                b = self._holds_job(db, batch_id, worker)
                if b is None:
                    return False
                for f in (output_file, error_file):
                    if f is not None:
                        db.execute(_REPLACE_FILE, file_values(f))
                return self._transition(
                    db,
                    batch_id,
                    b.status,
                    status,
                    output_file_id=None if output_file is None else output_file.id,
                    error_file_id=None if error_file is None else error_file.id,
                    job_owner=None,
                    job_lease_until=None,
                )

        return await self._run(q)

    # -- shards ---------------------------------------------------------------------------------------------
    async def claim_shard(
        self, worker: str, lease_s: float, *, not_owners: Collection[str] = ()
    ) -> ShardClaim | None:
        others = sorted(set(not_owners))
        skip = f" AND b.owner NOT IN ({sql.marks(len(others))})" if others else ""

        def q(db: sqlite3.Connection) -> ShardClaim | None:
            now = self._clock()
            with self._tx(db):
                # Weighted fair share across owners, then within an owner's batches (sql.claim_order).
                row = db.execute(
                    f"SELECT {prefixed('s', SHARD_FIELDS)}, b.status AS bstatus, b.endpoint, b.expires_at, f.blob_key, "
                    f"b.owner AS bowner, {sql.OWNER_WEIGHT} AS weight "
                    f"FROM shards s {sql.CLAIM_JOINS.format(load=sql.owner_load('?'))} "
                    f"WHERE {sql.CLAIMABLE_BATCH} AND {sql.claimable_shard('?')}{skip} "
                    f"ORDER BY {sql.claim_order('?')} LIMIT 1",
                    (now, now, now, *others, now),
                ).fetchone()
                if row is None:
                    return None
                attempt = row["attempt"] + 1
                db.execute(sql.TAKE_SHARD, (attempt, worker, now + lease_s, now, row["batch_id"], row["idx"]))
                return claim_from_row(row, attempt, worker, now)

        return await self._run(q)

    async def heartbeat_shard(
        self, claim: ShardClaim, lease_s: float, completed: int, failed: int, usage: Usage
    ) -> Heartbeat | None:
        def q(db: sqlite3.Connection) -> Heartbeat | None:
            now = self._clock()
            with self._tx(db):
                cur = db.execute(
                    "UPDATE shards SET lease_until = ?, completed = ?, failed = ?, input_tokens = ?, "
                    f"cached_tokens = ?, output_tokens = ?, reasoning_tokens = ? WHERE {sql.FENCE}",
                    (now + lease_s, completed, failed, *usage_values(usage), *fence(claim)),
                )
                if cur.rowcount != 1:
                    return None
                row = db.execute(
                    "SELECT status, expires_at FROM batches WHERE id = ?", (claim.shard.batch_id,)
                ).fetchone()
                return Heartbeat(S(row["status"]), row["expires_at"], now)

        return await self._run(q)

    async def release_shard(
        self, claim: ShardClaim, *, retry_in: float = 0.0, failure: str | None = None
    ) -> None:
        def q(db: sqlite3.Connection) -> None:
            retry_at = self._clock() + retry_in if retry_in > 0 else None
            db.execute(
                f"UPDATE shards SET {RELEASED}, retry_at = ?, failures = failures + ?, "
                f"last_error = COALESCE(?, last_error) WHERE {sql.FENCE}",
                (retry_at, 0 if failure is None else 1, failure, *fence(claim)),
            )

        await self._run(q)

    async def release_worker(self, worker: str) -> int:
        def q(db: sqlite3.Connection) -> int:
            with self._tx(db):
                cur = db.execute(sql.RELEASE_WORKER_SHARDS, (worker,))
                db.execute(sql.RELEASE_WORKER_JOBS, (worker,))
                return cur.rowcount

        return await self._run(q)

    async def release_all(self) -> None:
        """Give back every lease (only for a single-process owner of this database, such as `batchyard run`)."""

        def q(db: sqlite3.Connection) -> None:
            with self._tx(db):
                db.execute(sql.RELEASE_ALL_SHARDS)
                db.execute("UPDATE batches SET job_owner = NULL, job_lease_until = NULL")

        await self._run(q)

    async def release_job(self, batch_id: str, worker: str) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(sql.RELEASE_JOB, (batch_id, worker))

        await self._run(q)

    async def complete_shard(self, claim: ShardClaim, result: ShardResult, expired: int) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            with self._tx(db):
                values = (result.completed, result.failed, expired, *usage_values(result.usage))
                cur = db.execute(sql.COMPLETE_SHARD, (*values, *_result_tail(result), *fence(claim)))
                if cur.rowcount != 1:
                    return False
                db.execute(sql.SHARD_DONE_AT, (self._clock(), claim.shard.batch_id, claim.shard.index))
                return True

        return await self._run(q)

    # per-key usage (caps)
    async def owner_usage(self, owner: str) -> OwnerUsage:
        now = int(self._clock())
        final = tuple(str(s) for s in TERMINAL)

        def q(db: sqlite3.Connection) -> OwnerUsage:
            files = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files "
                "WHERE owner = ? AND deleted = 0 AND (expires_at IS NULL OR expires_at > ?)",
                (owner, now),
            ).fetchone()
            uploads = db.execute(
                f"SELECT COUNT(*) FROM uploads WHERE owner = ? AND status = '{UploadStatus.PENDING}' "
                "AND expires_at > ?",
                (owner, now),
            ).fetchone()
            batches = db.execute(
                f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status NOT IN ({','.join('?' * len(final))})",
                (owner, *final),
            ).fetchone()
            return OwnerUsage(files[0], files[1], uploads[0], batches[0])

        return await self._run(q)

    async def admission_load(self, window_s: float) -> AdmissionLoad:
        def q(db: sqlite3.Connection) -> AdmissionLoad:
            now = self._clock()
            with self._tx(db):
                waiting = tuple(
                    (str(o), int(n), float(w)) for o, n, w in db.execute(sql.LINES_WAITING_BY_OWNER) if n
                )
                done, first = db.execute(sql.RECENT_THROUGHPUT, (now - window_s,)).fetchone()
                size, lines = db.execute(sql.MEASURED_LINE_BYTES, (now - window_s,)).fetchone()
            backlog = sum(n for _, n, _ in waiting)
            return AdmissionLoad(now, backlog, int(done), first, int(size), int(lines), waiting)

        return await self._run(q)

    async def batch_stats(self) -> BatchStats:
        def q(db: sqlite3.Connection) -> BatchStats:
            counts = {S(status): int(n) for status, n in db.execute(sql.BATCH_COUNTS)}
            waiting = db.execute(sql.LINES_WAITING).fetchone()
            return BatchStats(counts, int(waiting[0]))

        return await self._run(q)

    # blob lifecycle (sweeper)
    async def removable_deleted_files(self, limit: int) -> list[FileRecord]:
        def q(db: sqlite3.Connection) -> list[FileRecord]:
            rows = db.execute(sql.REMOVABLE_DELETED_FILES, (limit,)).fetchall()
            return [file_from_row(r) for r in rows]

        return await self._run(q)

    async def forget_file_blob(self, file_id: str) -> None:
        await self._run(lambda db: db.execute(sql.FORGET_FILE_BLOB, (file_id,)))

    async def needed_blob_keys(self, keys: Sequence[str]) -> set[str]:
        def q(db: sqlite3.Connection) -> set[str]:
            needed: set[str] = set()
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT blob_key FROM files WHERE blob_removed = 0 AND blob_key IN ({marks}) "
                    "UNION SELECT p.blob_key FROM upload_parts p JOIN uploads u ON u.id = p.upload_id "
                    f"WHERE u.status = '{UploadStatus.PENDING}' AND p.blob_key IN ({marks})",
                    (*chunk, *chunk),
                ).fetchall()
                needed.update(r[0] for r in rows)
            return needed

        return await self._run(q)

    async def batches_done_with(self, batch_ids: Sequence[str]) -> set[str]:
        def q(db: sqlite3.Connection) -> set[str]:
            live: set[str] = set()
            for i in range(0, len(batch_ids), 500):
                chunk = list(batch_ids[i : i + 500])
                rows = db.execute(
                    f"SELECT id FROM batches WHERE id IN ({sql.marks(len(chunk))}) AND status IN {_UNFINISHED}",
                    chunk,
                ).fetchall()
                live.update(r[0] for r in rows)
            return set(batch_ids) - live

        return await self._run(q)

    # -- projects and API keys ------------------------------------------------------------------------------
    async def insert_project(self, rec: ProjectRecord) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            return db.execute(tq.INSERT_PROJECT, tq.project_values(rec)).rowcount == 1

        return await self._run(q)

    async def _one_project(self, statement: str, arg: str) -> ProjectRecord | None:
        def q(db: sqlite3.Connection) -> ProjectRecord | None:
            row = db.execute(statement, (arg,)).fetchone()
            return None if row is None else tq.project_from_row(row)

        return await self._run(q)

    async def get_project(self, project_id: str) -> ProjectRecord | None:
        return await self._one_project(tq.GET_PROJECT, project_id)

    async def project_by_name(self, name: str) -> ProjectRecord | None:
        return await self._one_project(tq.PROJECT_BY_NAME, name)

    async def list_projects(self, *, limit: int, after: str | None, include_archived: bool) -> Page:
        statement = tq.list_projects(include_archived, after is not None)
        args = [a for a in (after,) if a is not None]

        def q(db: sqlite3.Connection) -> Page:
            rows = db.execute(statement, (*args, limit + 1)).fetchall()
            return Page([tq.project_from_row(r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(q)

    async def archive_project(self, project_id: str, now: int) -> ProjectRecord | None:
        def q(db: sqlite3.Connection) -> ProjectRecord | None:
            with self._tx(db):
                db.execute(tq.ARCHIVE_PROJECT, (now, project_id))
                row = db.execute(tq.GET_PROJECT, (project_id,)).fetchone()
                return None if row is None else tq.project_from_row(row)

        return await self._run(q)

    async def set_project_weight(self, project_id: str, weight: float) -> ProjectRecord | None:
        def q(db: sqlite3.Connection) -> ProjectRecord | None:
            with self._tx(db):
                db.execute(tq.SET_PROJECT_WEIGHT, (weight, project_id))
                row = db.execute(tq.GET_PROJECT, (project_id,)).fetchone()
                return None if row is None else tq.project_from_row(row)

        return await self._run(q)

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        await self._run(lambda db: db.execute(tq.INSERT_KEY, tq.key_values(rec)))

    async def key_holder(self, key_hash: str) -> KeyHolder | None:
        def q(db: sqlite3.Connection) -> KeyHolder | None:
            row = db.execute(tq.KEY_HOLDER, (key_hash,)).fetchone()
            return None if row is None else tq.holder_from_row(row)

        return await self._run(q)

    async def list_api_keys(self, project_id: str | None, *, limit: int, after: str | None) -> Page:
        statement = tq.list_keys(project_id is not None, after is not None)
        args = [a for a in (project_id, after) if a is not None]

        def q(db: sqlite3.Connection) -> Page:
            rows = db.execute(statement, (*args, limit + 1)).fetchall()
            return Page([tq.key_from_row(r) for r in rows[:limit]], len(rows) > limit)

        return await self._run(q)

    async def revoke_api_key(self, key_id: str, now: int) -> ApiKeyRecord | None:
        def q(db: sqlite3.Connection) -> ApiKeyRecord | None:
            with self._tx(db):
                db.execute(tq.REVOKE_KEY, (now, key_id))
                row = db.execute(tq.GET_KEY, (key_id,)).fetchone()
                return None if row is None else tq.key_from_row(row)

        return await self._run(q)

    async def has_api_keys(self) -> bool:
        return await self._run(lambda db: db.execute(tq.HAS_KEYS).fetchone() is not None)

    async def enqueued_input_bytes(self, owner: str, model: str) -> int:
        return await self._run(lambda db: int(db.execute(tq.ENQUEUED_BYTES, (owner, model)).fetchone()[0]))

    async def delete_batch(self, owner: str, batch_id: str) -> BatchRecord | None:
        def q(db: sqlite3.Connection) -> BatchRecord | None:
            with self._tx(db):
                b = self._get_batch(db, batch_id)
                if b is None or b.owner != owner:
                    return None
                if b.status in TERMINAL:
                    db.execute(sql.DELETE_SHARDS, (batch_id,))
                    db.execute(sql.DELETE_ENDED_BATCH, (batch_id,))
                return b

        return await self._run(q)

    # -- idempotency keys -----------------------------------------------------------------------------------
    async def claim_idempotency_key(self, rec: IdempotencyKey, live_since: int) -> IdempotencyKey:
        def q(db: sqlite3.Connection) -> IdempotencyKey:
            with self._tx(db):
                db.execute(sql.PRUNE_IDEMPOTENCY_KEYS, (live_since,))
                db.execute(sql.CLAIM_IDEMPOTENCY_KEY, (*_key_values(rec), live_since))
                row = db.execute(sql.GET_IDEMPOTENCY_KEY, (rec.owner, rec.key)).fetchone()
            return IdempotencyKey(*row)

        return await self._run(q)

    async def drop_idempotency_key(self, owner: str, key: str, object_id: str) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(sql.DROP_IDEMPOTENCY_KEY, (owner, key, object_id))

        await self._run(q)

    # -- upstream load across machines ----------------------------------------------------------------------
    async def exchange_load(
        self, holder: str, machine: str, loads: Sequence[tuple[str, int, int]], ttl_s: float
    ) -> list[UpstreamLoad]:
        def q(db: sqlite3.Connection) -> list[UpstreamLoad]:
            now = self._clock()
            with self._tx(db):
                db.execute(sql.PRUNE_LOAD, (now,))
                db.executemany(sql.PUT_LOAD, [(holder, u, machine, d, f, now + ttl_s) for u, d, f in loads])
                rows = db.execute(sql.OTHERS_LOAD, (holder, now)).fetchall()
            return [UpstreamLoad(*r) for r in rows]

        return await self._run(q)


def _key_values(rec: IdempotencyKey) -> tuple[str, str, str, str, str, int]:
    return (rec.owner, rec.key, rec.route, rec.fingerprint, rec.object_id, rec.created_at)


def _result_tail(r: ShardResult) -> tuple[str | None, str | None, int, int]:
    return (r.out_key, r.err_key, r.cancelled, r.upstream_failed)
