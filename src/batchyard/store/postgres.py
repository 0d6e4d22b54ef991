"""PostgreSQL MetadataStore (many API replicas and workers sharing one database): asyncpg pool, SKIP LOCKED claims.

It behaves like `sqlite.SQLiteStore` call for call; the contract suite runs against both. Differences of mechanism:

- Leases and timestamps use the database's clock (`now()`, the start of the current transaction, so a claim's
  filter, its new lease and the `db_now` it reports agree), unless a `clock` is given (tests): then its value is sent
  as a query parameter in place of `now()`. Every query says `COALESCE($n::float8, <database now>)`.
- Claims (shards and batch-level jobs) take their row with `FOR UPDATE SKIP LOCKED`, so concurrent workers never
  wait on each other and never get the same row; the fenced updates (attempt + lease_owner + status) are single
  statements.
- Migrations run in one transaction under a transaction-scoped advisory lock, so processes starting together apply
  each numbered file exactly once.
- Driver errors (asyncpg's, and OSError from the socket) become StoreError in one place, `_driver_errors`, which
  wraps every use of a connection (`_conn`, `_tx`) and the pool's opening and closing.
- SQLite's `INSERT OR REPLACE` (finish_batch's output files) is a DELETE and an INSERT here, so the replaced file gets
  a new `seq` and is undeleted, as on SQLite.
- Every list pages by `seq`. SQLite commits one writer at a time, so `seq` order is commit order; here two
  transactions may commit their inserts out of `seq` order, and a client paging at that instant can miss the row that
  committed second. Files and batches are inserted one per API request, so this is the usual cursor-paging caveat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

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
    BATCH_FIELDS,
    EVENT_FIELDS,
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
from batchyard.store.sql import numbered as pg

S = BatchStatus
Row = Any  # asyncpg.Record: asyncpg ships no type information

# pg_advisory_xact_lock key held while migrating ("batchyrd" as 8 bytes). Advisory locks are per database.
MIGRATION_LOCK = int.from_bytes(b"batchyrd", "big") & 0x7FFF_FFFF_FFFF_FFFF

# A batch with its live counts and usage: sums over its shards (the running shards' heartbeats included).
_BATCH_SELECT = (
    f"SELECT {prefixed('b', BATCH_FIELDS)}, c.* FROM batches b CROSS JOIN LATERAL ("
    "SELECT COALESCE(SUM(s.completed), 0)::bigint AS sum_completed, COALESCE(SUM(s.failed), 0)::bigint AS sum_failed, "
    "COALESCE(SUM(s.input_tokens), 0)::bigint AS sum_input, COALESCE(SUM(s.cached_tokens), 0)::bigint AS sum_cached, "
    "COALESCE(SUM(s.output_tokens), 0)::bigint AS sum_output, "
    "COALESCE(SUM(s.reasoning_tokens), 0)::bigint AS sum_reasoning, "
    "COALESCE(SUM(s.upstream_failed), 0)::bigint AS sum_upstream_failed, "
    "COALESCE(SUM(s.expired), 0)::bigint AS sum_expired, COALESCE(SUM(s.cancelled), 0)::bigint AS sum_cancelled, "
    "COALESCE(SUM(s.failed) FILTER (WHERE s.status = 'done'), 0)::bigint AS sum_done_failed "
    "FROM shards s WHERE s.batch_id = b.id) c"
)
_UNFINISHED = sorted(str(s) for s in UNFINISHED)  # a text[] parameter


def _now(param: str) -> str:
    """The store's clock in SQL: the test clock's value when one is sent in `param`, else the database's."""
    return f"COALESCE({param}::float8, extract(epoch FROM now())::float8)"


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations, in order."""
    return sql.migrations("postgres")


async def migrate(conn: Any) -> list[int]:
    """Apply the migrations not applied yet, under an advisory lock; returns the versions applied now."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
        done = {int(r["version"]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migrations():
            if version not in done:
                await conn.execute(sql)  # no arguments: the simple protocol runs every statement of the file
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
    return applied


@contextmanager
def _driver_errors() -> Iterator[None]:
    """The one place where asyncpg's exceptions become ours."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
        raise StoreError(f"postgres: {type(e).__name__}: {e}") from e


CHANNEL = "batchyard_changes"  # NOTIFY channel; payload "cancel:<batch id>" or "work:<batch id>"


async def _notify(conn: Any, what: str, batch_id: str) -> None:
    """Tell every listening worker, when the transaction commits: `what` is "cancel" or "work"."""
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{what}:{batch_id}")


def _rowcount(status: str) -> int:
    """asyncpg's command tag ("UPDATE 1", "INSERT 0 3") -> rows affected."""
    return int(status.rsplit(" ", 1)[1])


class _Args:
    """Numbered placeholders for a query built piece by piece: `args(value)` -> "$n"."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _batch(row: Row) -> BatchRecord:
    """A row of _BATCH_SELECT (with its shard sums) -> BatchRecord."""
    usage = Usage(row["sum_input"], row["sum_cached"], row["sum_output"], row["sum_reasoning"])
    outcomes = Outcomes(
        row["sum_upstream_failed"], row["sum_expired"], row["sum_cancelled"], row["sum_done_failed"]
    )
    return batch_from_row(row, row["sum_completed"], row["sum_failed"], usage, outcomes)


class PostgresStore(MetadataStore):
    def __init__(
        self, dsn: str, *, clock: Callable[[], float] | None = None, idle_tx_timeout: float = 60.0
    ) -> None:
        """`idle_tx_timeout`: the server ends a session of ours left idle inside a transaction for this long (its
        `idle_in_transaction_session_timeout`). Our transactions hold only statements, so one idle for seconds
        belongs to a process that is stopped or cut off, and its row locks (a batch's row, a shard's) would
        otherwise hold every other writer of those rows, a cancel included, until TCP gave up on it (hours)."""
        self._dsn = dsn
        self._clock = clock
        self._idle_tx_timeout_ms = max(1, round(idle_tx_timeout * 1000))
        self._pool: Any = None

    # -- plumbing -------------------------------------------------------------------------------------------
    def _t(self) -> float | None:
        """The test clock's reading, or None: the database's clock decides."""
        return None if self._clock is None else self._clock()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise StoreError("store is not open")
        with _driver_errors():
            async with self._pool.acquire() as conn:
                yield conn

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Any]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def open(self) -> None:
        with _driver_errors():
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=10,
                server_settings={"idle_in_transaction_session_timeout": str(self._idle_tx_timeout_ms)},
            )
            try:
                async with pool.acquire() as conn:
                    await migrate(conn)
            except BaseException:
                await pool.close()
                raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with _driver_errors():
                await pool.close()

    async def listen(self, on_change: Callable[[str], None]) -> bool:
        """LISTEN on a connection of its own (not the pool's) until it breaks or the caller is cancelled."""
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def notified(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            on_change(payload.partition(":")[0])

        def terminated(*_: object) -> None:
            if not lost.done():
                lost.set_result(None)

        with _driver_errors():
            conn = await asyncpg.connect(self._dsn, timeout=10)
        try:
            conn.add_termination_listener(terminated)
            with _driver_errors():
                await conn.add_listener(CHANNEL, notified)
            on_change("work")  # changes made while we were not listening
            await lost
            raise StoreError("postgres: the LISTEN connection was lost")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.close(timeout=5))

    async def now(self) -> float:
        if self._clock is not None:
            return self._clock()
        async with self._conn() as conn:
            return float(await conn.fetchval(f"SELECT {_now('$1')}", None))

    # -- files ----------------------------------------------------------------------------------------------
    async def insert_file(self, rec: FileRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.INSERT_FILE), *file_values(rec))

    async def get_file(self, owner: str | None, file_id: str) -> FileRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(pg(sql.GET_FILE), file_id)
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return file_from_row(row)

    async def insert_upload(self, rec: UploadRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.INSERT_UPLOAD), *upload_values(rec))

    async def get_upload(self, owner: str | None, upload_id: str) -> UploadRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(pg(sql.GET_UPLOAD), upload_id)
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return upload_from_row(row)

    async def insert_upload_part(self, part: UploadPartRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.INSERT_PART), *part_values(part))

    async def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        # parts are added one request at a time; created_at then id keeps a stable order (the API orders by
        # the part ids the client lists, never by this)
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {PART_COLS} FROM upload_parts WHERE upload_id = $1 ORDER BY created_at, id",
                upload_id,
            )
        return [part_from_row(r) for r in rows]

    async def expired_uploads(self, limit: int) -> list[UploadRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {UPLOAD_COLS} FROM uploads WHERE status = '{UploadStatus.PENDING}' "
                f"AND expires_at <= trunc({_now('$1')})::bigint LIMIT $2",
                self._t(),
                limit,
            )
        return [upload_from_row(r) for r in rows]

    async def finish_upload(self, owner: str, upload_id: str, status: str, file: FileRecord | None) -> bool:
        dst = str(finished_upload(status))
        async with self._tx() as conn:
            done = await conn.execute(pg(sql.FINISH_UPLOAD), dst, file.id if file else None, upload_id, owner)
            if _rowcount(done) != 1:
                return False
            if file is not None:
                await conn.execute(pg(sql.INSERT_FILE), *file_values(file))
            return True

    async def list_files(
        self, owner: str, *, purpose: str | None, limit: int, order: str, after: str | None
    ) -> Page:
        args = _Args()
        o = args(owner)
        where = [f"owner = {o}", "NOT deleted"]
        if purpose is not None:
            where.append(f"purpose = {args(purpose)}")
        if after is not None:
            # An unknown or foreign cursor yields NULL: no row compares with it, the page is empty.
            op = ">" if order == "asc" else "<"
            where.append(f"seq {op} (SELECT seq FROM files WHERE id = {args(after)} AND owner = {o})")
        direction = "ASC" if order == "asc" else "DESC"
        sql = (
            f"SELECT {FILE_COLS} FROM files WHERE {' AND '.join(where)} "
            f"ORDER BY seq {direction} LIMIT {args(limit + 1)}"
        )
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *args.values)
        return Page([file_from_row(r) for r in rows[:limit]], len(rows) > limit)

    async def delete_file(self, owner: str, file_id: str) -> tuple[FileRecord, bool] | None:
        async with self._tx() as conn:
            row = await conn.fetchrow(
                f"SELECT {FILE_COLS} FROM files WHERE id = $1 AND owner = $2 AND NOT deleted FOR UPDATE",
                file_id,
                owner,
            )
            if row is None:
                return None
            await conn.execute(pg(sql.MARK_FILE_DELETED), file_id)
            live = await conn.fetchval(pg(sql.FILE_IN_USE), file_id)
            return file_from_row(row), live is None

    async def expired_files(self, limit: int) -> list[FileRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {FILE_COLS} FROM files WHERE NOT deleted AND expires_at IS NOT NULL "
                f"AND expires_at <= trunc({_now('$1')})::bigint LIMIT $2",
                self._t(),
                limit,
            )
        return [file_from_row(r) for r in rows]

    # -- batches --------------------------------------------------------------------------------------------
    async def _get_batch(self, conn: Any, batch_id: str, *, lock: bool = False) -> BatchRecord | None:
        row = await conn.fetchrow(
            f"{_BATCH_SELECT} WHERE b.id = $1{' FOR UPDATE OF b' if lock else ''}", batch_id
        )
        return None if row is None else _batch(row)

    async def _transition(
        self, conn: Any, batch_id: str, src: BatchStatus, dst: BatchStatus, **fields: Any
    ) -> bool:
        stamp = check_transition(src, dst)
        args = _Args()
        sets = [f"{k} = {args(v)}" for k, v in {"status": str(dst), **fields}.items()]
        if stamp is not None:
            sets.append(f"{stamp} = trunc({_now(args(self._t()))})::bigint")
        status = await conn.execute(
            f"UPDATE batches SET {', '.join(sets)} WHERE id = {args(batch_id)} AND status = {args(str(src))}",
            *args.values,
        )
        if _rowcount(status) != 1:
            return False
        if dst in TERMINAL:  # the webhook, in the same transaction as the final status
            await conn.execute(
                "INSERT INTO webhook_events (id, batch_id, owner, type, created_at, next_at) "
                f"SELECT $1, id, owner, $2, trunc({_now('$3')})::bigint, {_now('$3')} FROM batches WHERE id = $4 "
                "ON CONFLICT DO NOTHING",
                event_id(),
                webhook_type(dst),
                self._t(),
                batch_id,
            )
        return True

    async def claim_webhook_events(
        self, worker: str, lease_s: float, limit: int, since: int
    ) -> list[WebhookEvent]:
        async with self._tx() as conn:
            rows = await conn.fetch(
                f"WITH due AS (SELECT seq FROM webhook_events WHERE status = '{WebhookStatus.PENDING}' "
                f"AND next_at <= {_now('$1')} "
                f"AND created_at >= $2 AND (lease_until IS NULL OR lease_until < {_now('$1')}) "
                "ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) "
                f"UPDATE webhook_events e SET lease_owner = $4, lease_until = {_now('$1')} + $5 FROM due "
                f"WHERE e.seq = due.seq RETURNING {prefixed('e', EVENT_FIELDS)}",
                self._t(),
                since,
                limit,
                worker,
                lease_s,
            )
        return sorted((event_from_row(r) for r in rows), key=lambda e: e.created_at)

    async def settle_webhook_event(
        self, event_id: str, worker: str, status: str, next_at: float | None, error: str | None
    ) -> bool:
        dst = str(settled_webhook(status))
        async with self._conn() as conn:
            done = await conn.execute(pg(sql.SETTLE_EVENT), dst, next_at, error, event_id, worker)
        return _rowcount(done) == 1

    # -- webhook endpoints and the delivery log -------------------------------------------------------------
    async def insert_webhook_endpoint(self, rec: WebhookEndpoint) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(wq.INSERT_ENDPOINT), *wq.endpoint_values(rec))

    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(pg(wq.GET_ENDPOINT), endpoint_id)
        return None if row is None else wq.endpoint_from_row(row)

    async def list_webhook_endpoints(
        self, owner: str | None, *, include_disabled: bool
    ) -> list[WebhookEndpoint]:
        statement = pg(wq.list_endpoints(owner is not None, include_disabled))
        async with self._conn() as conn:
            rows = await conn.fetch(statement, *[a for a in (owner,) if a is not None])
        return [wq.endpoint_from_row(r) for r in rows]

    async def rotate_webhook_secret(
        self, endpoint_id: str, secret: str, previous_until: int
    ) -> WebhookEndpoint | None:
        async with self._tx() as conn:
            done = await conn.execute(pg(wq.ROTATE_SECRET), previous_until, secret, endpoint_id)
            if _rowcount(done) != 1:
                return None
            row = await conn.fetchrow(pg(wq.GET_ENDPOINT), endpoint_id)
        return None if row is None else wq.endpoint_from_row(row)

    async def disable_webhook_endpoint(self, endpoint_id: str, now: int) -> WebhookEndpoint | None:
        async with self._tx() as conn:
            await conn.execute(pg(wq.DISABLE_ENDPOINT), now, endpoint_id)
            row = await conn.fetchrow(pg(wq.GET_ENDPOINT), endpoint_id)
        return None if row is None else wq.endpoint_from_row(row)

    async def webhook_targets(self, ev: WebhookEvent) -> tuple[list[WebhookEndpoint], set[str]]:
        async with self._conn() as conn:
            rows = await conn.fetch(pg(wq.TARGET_ENDPOINTS), ev.owner, ev.created_at)
            took = {str(r[0]) for r in await conn.fetch(pg(wq.TOOK_IT), ev.id)}
        return [wq.endpoint_from_row(r) for r in rows], took

    async def record_webhook_attempts(self, attempts: Sequence[DeliveryAttempt]) -> None:
        if not attempts:
            return
        async with self._conn() as conn:
            await conn.executemany(pg(wq.INSERT_ATTEMPT), [wq.attempt_values(a) for a in attempts])

    async def list_webhook_events(self, owner: str, *, limit: int, after: str | None) -> Page:
        args = [owner, *((after, owner) if after is not None else ()), limit + 1]
        async with self._conn() as conn:
            rows = await conn.fetch(pg(wq.list_events(after is not None)), *args)
        return Page([event_from_row(r) for r in rows[:limit]], len(rows) > limit)

    async def get_webhook_event(
        self, owner: str, event_id: str
    ) -> tuple[WebhookEvent, list[DeliveryAttempt]] | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(pg(wq.GET_EVENT), event_id, owner)
            if row is None:
                return None
            attempts = await conn.fetch(pg(wq.ATTEMPTS_OF), event_id)
        return event_from_row(row), [wq.attempt_from_row(a) for a in attempts]

    async def insert_batch(self, rec: BatchRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.INSERT_BATCH), *batch_values(rec))
            await _notify(conn, "work", rec.id)  # a worker elsewhere validates it now, not at its next poll

    async def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        async with self._conn() as conn:
            b = await self._get_batch(conn, batch_id)
        if b is None or (owner is not None and b.owner != owner):
            return None
        return b

    async def list_batches(self, owner: str, *, limit: int, after: str | None) -> Page:
        where = "b.owner = $1"
        args: list[Any] = [owner, limit + 1]
        if after is not None:
            where += " AND b.seq < (SELECT seq FROM batches WHERE id = $3 AND owner = $1)"
            args.append(after)
        async with self._conn() as conn:
            rows = await conn.fetch(f"{_BATCH_SELECT} WHERE {where} ORDER BY b.seq DESC LIMIT $2", *args)
        return Page([_batch(r) for r in rows[:limit]], len(rows) > limit)

    async def request_cancel(self, owner: str, batch_id: str) -> BatchRecord | None:
        async with self._tx() as conn:
            b = await self._get_batch(conn, batch_id, lock=True)
            if b is None or b.owner != owner:
                return None
            dst = on(Step.CANCEL, b.status)
            if dst is None:
                return b
            await self._transition(conn, batch_id, b.status, dst)
            await _notify(conn, "cancel", batch_id)  # delivered when this transaction commits
            return await self._get_batch(conn, batch_id)

    # -- batch-level jobs -----------------------------------------------------------------------------------
    async def _claim_job(self, worker: str, lease_s: float, where: str) -> BatchJob | None:
        async with self._tx() as conn:
            picked = await conn.fetchrow(
                f"SELECT b.id, t.db_now FROM batches b CROSS JOIN (SELECT {_now('$1')} AS db_now) t "
                f"WHERE ({where}) AND (b.job_owner IS NULL OR b.job_lease_until < t.db_now) "
                "ORDER BY b.seq LIMIT 1 FOR UPDATE OF b SKIP LOCKED",
                self._t(),
            )
            if picked is None:
                return None
            now = float(picked["db_now"])
            await conn.execute(
                "UPDATE batches SET job_owner = $1, job_lease_until = $2 WHERE id = $3",
                worker,
                now + lease_s,
                picked["id"],
            )
            batch = await self._get_batch(conn, picked["id"])
            assert batch is not None
            frow = await conn.fetchrow(pg(sql.GET_FILE), batch.input_file_id)
            return BatchJob(batch, None if frow is None else file_from_row(frow), now)

    async def claim_validation(self, worker: str, lease_s: float) -> BatchJob | None:
        return await self._claim_job(worker, lease_s, sql.NEEDS_VALIDATION)

    async def claim_finalization(self, worker: str, lease_s: float) -> BatchJob | None:
        return await self._claim_job(worker, lease_s, sql.NEEDS_FINALIZATION)

    async def _holds_job(self, conn: Any, batch_id: str, worker: str) -> BatchRecord | None:
        """The batch, locked for this transaction, if `worker` holds its job lease."""
        row = await conn.fetchrow(
            f"{_BATCH_SELECT} WHERE b.id = $1 AND b.job_owner = $2 FOR UPDATE OF b", batch_id, worker
        )
        return None if row is None else _batch(row)

    async def extend_job(self, batch_id: str, worker: str, lease_s: float) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(
                f"UPDATE batches SET job_lease_until = {_now('$1')} + $2 WHERE id = $3 AND job_owner = $4",
                self._t(),
                lease_s,
                batch_id,
                worker,
            )
        return _rowcount(status) == 1

    async def plan_batch(
        self,
        batch_id: str,
        worker: str,
        shards: Sequence[ShardPlan],
        total: int,
        model: str | None,
        admit: Callable[[int], bool] | None = None,
    ) -> bool:
        async with self._tx() as conn:
            b = await self._holds_job(conn, batch_id, worker)
            dst = None if b is None else on(Step.PLANNED, b.status)
            if b is None or dst is None:
                return False
            if admit is not None and model is not None:
                # The owner's planners one at a time (until this transaction ends): each sums what the ones before
                # it committed (READ COMMITTED: the sum is read after the lock is held).
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", f"enqueued:{b.owner}"
                )
                enqueued = int(await conn.fetchval(pg(tq.ENQUEUED_BYTES), b.owner, model))
                if not admit(enqueued):
                    raise OverEnqueued(enqueued)
            # One statement whatever the number of shards (a 100M-line batch has ~100k).
            await conn.execute(
                "INSERT INTO shards (batch_id, idx, start_off, end_off, first_line, line_count, spans) "
                "SELECT $1, * FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::int[], "
                "$7::bytea[])",
                batch_id,
                [p.index for p in shards],
                [p.start for p in shards],
                [p.end for p in shards],
                [p.first_line for p in shards],
                [p.line_count for p in shards],
                [pack_spans(p.spans) for p in shards],
            )
            await conn.execute(pg(sql.PLANNED), total, model, batch_id)
            if dst != b.status:
                await self._transition(conn, batch_id, b.status, dst)
            await _notify(conn, "work", batch_id)  # its shards can be claimed everywhere now
            return True

    async def fail_batch(self, batch_id: str, worker: str, errors: list[dict[str, Any]]) -> bool:
        async with self._tx() as conn:
            b = await self._holds_job(conn, batch_id, worker)
            dst = None if b is None else on(Step.INVALID, b.status)
            if b is None or dst is None:
                return False
            fields = {
                "errors": json.dumps(errors),
                "planned": True,
                "job_owner": None,
                "job_lease_until": None,
            }
            return await self._transition(conn, batch_id, b.status, dst, **fields)

    async def begin_finalizing(self, batch_id: str, worker: str) -> BatchRecord | None:
        async with self._tx() as conn:
            b = await self._holds_job(conn, batch_id, worker)
            if b is None:
                return None
            dst = on(Step.FINALIZE, b.status)
            if dst is not None and dst != b.status:
                await self._transition(conn, batch_id, b.status, dst)
            return await self._get_batch(conn, batch_id)

    async def done_shards(self, batch_id: str) -> list[ShardRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(pg(sql.DONE_SHARDS), batch_id)
        return [shard_from_row(r) for r in rows]

    async def batch_expired_lines(self, batch_id: str) -> int:
        async with self._conn() as conn:
            n = await conn.fetchval(pg(sql.EXPIRED_LINES), batch_id)
        return int(n)

    async def finish_batch(
        self,
        batch_id: str,
        worker: str,
        status: BatchStatus,
        output_file: FileRecord | None,
        error_file: FileRecord | None,
    ) -> bool:
        async with self._tx() as conn:
            b = await self._holds_job(conn, batch_id, worker)
            if b is None:
                return False
            for f in (output_file, error_file):
                if f is not None:
                    # SQLite's INSERT OR REPLACE: the old row goes, a new one (new seq, not deleted) comes.
                    await conn.execute("DELETE FROM files WHERE id = $1", f.id)
                    await conn.execute(pg(sql.INSERT_FILE), *file_values(f))
            return await self._transition(
                conn,
                batch_id,
                b.status,
                status,
                output_file_id=None if output_file is None else output_file.id,
                error_file_id=None if error_file is None else error_file.id,
                job_owner=None,
                job_lease_until=None,
            )

    # -- shards ---------------------------------------------------------------------------------------------
    async def claim_shard(
        self, worker: str, lease_s: float, *, not_owners: Collection[str] = ()
    ) -> ShardClaim | None:
        async with self._tx() as conn:
            # Weighted fair share across owners, then within an owner's batches (sql.claim_order). A row another
            # worker is claiming is skipped.
            row = await conn.fetchrow(
                f"SELECT {prefixed('s', SHARD_FIELDS)}, b.status AS bstatus, b.endpoint, b.expires_at, f.blob_key, "
                f"b.owner AS bowner, {sql.OWNER_WEIGHT} AS weight, t.db_now "
                f"FROM (SELECT {_now('$1')} AS db_now) t CROSS JOIN shards s "
                f"{sql.CLAIM_JOINS.format(load=sql.owner_load(_now('$1')))} "  # now() is the transaction's
                f"WHERE {sql.CLAIMABLE_BATCH} AND {sql.claimable_shard('t.db_now')} "
                "AND b.owner <> ALL($2::text[]) "
                f"ORDER BY {sql.claim_order('t.db_now')} "
                "LIMIT 1 FOR UPDATE OF s SKIP LOCKED",
                self._t(),
                sorted(set(not_owners)),
            )
            if row is None:
                return None
            now = float(row["db_now"])
            attempt = int(row["attempt"]) + 1
            await conn.execute(
                pg(sql.TAKE_SHARD), attempt, worker, now + lease_s, now, row["batch_id"], row["idx"]
            )
        return claim_from_row(row, attempt, worker, now)

    async def heartbeat_shard(
        self, claim: ShardClaim, lease_s: float, completed: int, failed: int, usage: Usage
    ) -> Heartbeat | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "UPDATE shards s SET lease_until = t.db_now + $2, completed = $3, failed = $4, input_tokens = $5, "
                "cached_tokens = $6, output_tokens = $7, reasoning_tokens = $8 "
                f"FROM batches b, (SELECT {_now('$1')} AS db_now) t "
                "WHERE b.id = s.batch_id AND s.batch_id = $9 AND s.idx = $10 AND s.attempt = $11 "
                f"AND s.lease_owner = $12 AND s.status = '{ShardStatus.RUNNING}' "
                "RETURNING b.status, b.expires_at, t.db_now",
                self._t(),
                lease_s,
                completed,
                failed,
                *usage_values(usage),
                *fence(claim),
            )
        if row is None:
            return None
        return Heartbeat(S(row["status"]), row["expires_at"], float(row["db_now"]))

    async def release_shard(
        self, claim: ShardClaim, *, retry_in: float = 0.0, failure: str | None = None
    ) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"UPDATE shards SET {RELEASED}, "
                f"retry_at = CASE WHEN $5 > 0 THEN {_now('$8')} + $5 END, "
                "failures = failures + $6, last_error = COALESCE($7, last_error) "
                f"WHERE {pg(sql.FENCE)}",
                *fence(claim),
                float(retry_in),
                0 if failure is None else 1,
                failure,
                self._t(),
            )

    async def release_worker(self, worker: str) -> int:
        async with self._tx() as conn:
            released = await conn.execute(pg(sql.RELEASE_WORKER_SHARDS), worker)
            await conn.execute(pg(sql.RELEASE_WORKER_JOBS), worker)
        return _rowcount(released)

    async def release_job(self, batch_id: str, worker: str) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.RELEASE_JOB), batch_id, worker)

    async def complete_shard(self, claim: ShardClaim, result: ShardResult, expired: int) -> bool:
        async with self._tx() as conn:
            values = (result.completed, result.failed, expired, *usage_values(result.usage))
            status = await conn.execute(
                pg(sql.COMPLETE_SHARD),
                *values,
                result.out_key,
                result.err_key,
                result.cancelled,
                result.upstream_failed,
                *fence(claim),
            )
            if _rowcount(status) != 1:
                return False
            await conn.execute(
                f"UPDATE shards SET done_at = {_now('$1')} WHERE batch_id = $2 AND idx = $3",
                self._t(),
                claim.shard.batch_id,
                claim.shard.index,
            )
        return True

    # per-key usage (caps)
    async def owner_usage(self, owner: str) -> OwnerUsage:
        now = f"trunc({_now('$2')})::bigint"
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT "
                "(SELECT COUNT(*) FROM files WHERE owner = $1 AND NOT deleted "
                f"AND (expires_at IS NULL OR expires_at > {now})) AS files, "
                "(SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner = $1 AND NOT deleted "
                f"AND (expires_at IS NULL OR expires_at > {now})) AS stored, "
                f"(SELECT COUNT(*) FROM uploads WHERE owner = $1 AND status = '{UploadStatus.PENDING}' "
                f"AND expires_at > {now}) AS uploads, "
                "(SELECT COUNT(*) FROM batches WHERE owner = $1 AND NOT (status = ANY($3::text[]))) AS batches",
                owner,
                self._t(),
                [str(s) for s in TERMINAL],
            )
        assert row is not None
        return OwnerUsage(int(row["files"]), int(row["stored"]), int(row["uploads"]), int(row["batches"]))

    async def admission_load(self, window_s: float) -> AdmissionLoad:
        async with self._tx() as conn:
            now = float(await conn.fetchval(f"SELECT {_now('$1')}", self._t()))
            rows = await conn.fetch(sql.LINES_WAITING_BY_OWNER)
            done, first = await conn.fetchrow(pg(sql.RECENT_THROUGHPUT), now - window_s)
            size, lines = await conn.fetchrow(pg(sql.MEASURED_LINE_BYTES), now - window_s)
        waiting = tuple((str(o), int(n), float(w)) for o, n, w in rows if n)
        backlog = sum(n for _, n, _ in waiting)
        first_at = None if first is None else float(first)
        return AdmissionLoad(now, backlog, int(done), first_at, int(size), int(lines), waiting)

    async def batch_stats(self) -> BatchStats:
        async with self._conn() as conn:
            rows = await conn.fetch(sql.BATCH_COUNTS)
            waiting = await conn.fetchval(sql.LINES_WAITING)
        return BatchStats({S(r[0]): int(r[1]) for r in rows}, int(waiting))

    # blob lifecycle (sweeper)
    async def removable_deleted_files(self, limit: int) -> list[FileRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(pg(sql.REMOVABLE_DELETED_FILES), limit)
        return [file_from_row(r) for r in rows]

    async def forget_file_blob(self, file_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.FORGET_FILE_BLOB), file_id)

    async def needed_blob_keys(self, keys: Sequence[str]) -> set[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT blob_key FROM files WHERE NOT blob_removed AND blob_key = ANY($1::text[]) "
                "UNION SELECT p.blob_key FROM upload_parts p JOIN uploads u ON u.id = p.upload_id "
                f"WHERE u.status = '{UploadStatus.PENDING}' AND p.blob_key = ANY($1::text[])",
                list(keys),
            )
        return {str(r[0]) for r in rows}

    async def batches_done_with(self, batch_ids: Sequence[str]) -> set[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT id FROM batches WHERE id = ANY($1::text[]) AND status = ANY($2::text[])",
                list(batch_ids),
                _UNFINISHED,
            )
        return set(batch_ids) - {str(r[0]) for r in rows}

    # -- projects and API keys ------------------------------------------------------------------------------
    async def insert_project(self, rec: ProjectRecord) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(pg(tq.INSERT_PROJECT), *tq.project_values(rec))
        return str(status).endswith(" 1")

    async def _one_project(self, statement: str, arg: str) -> ProjectRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(pg(statement), arg)
        return None if row is None else tq.project_from_row(row)

    async def get_project(self, project_id: str) -> ProjectRecord | None:
        return await self._one_project(tq.GET_PROJECT, project_id)

    async def project_by_name(self, name: str) -> ProjectRecord | None:
        return await self._one_project(tq.PROJECT_BY_NAME, name)

    async def list_projects(self, *, limit: int, after: str | None, include_archived: bool) -> Page:
        statement = pg(tq.list_projects(include_archived, after is not None))
        args = [a for a in (after,) if a is not None]
        async with self._conn() as conn:
            rows = await conn.fetch(statement, *args, limit + 1)
        return Page([tq.project_from_row(r) for r in rows[:limit]], len(rows) > limit)

    async def archive_project(self, project_id: str, now: int) -> ProjectRecord | None:
        async with self._tx() as conn:
            await conn.execute(pg(tq.ARCHIVE_PROJECT), now, project_id)
            row = await conn.fetchrow(pg(tq.GET_PROJECT), project_id)
        return None if row is None else tq.project_from_row(row)

    async def set_project_weight(self, project_id: str, weight: float) -> ProjectRecord | None:
        async with self._tx() as conn:
            await conn.execute(pg(tq.SET_PROJECT_WEIGHT), weight, project_id)
            row = await conn.fetchrow(pg(tq.GET_PROJECT), project_id)
        return None if row is None else tq.project_from_row(row)

    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(tq.INSERT_KEY), *tq.key_values(rec))

    async def key_holder(self, key_hash: str) -> KeyHolder | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(pg(tq.KEY_HOLDER), key_hash)
        return None if row is None else tq.holder_from_row(row)

    async def list_api_keys(self, project_id: str | None, *, limit: int, after: str | None) -> Page:
        statement = pg(tq.list_keys(project_id is not None, after is not None))
        args = [a for a in (project_id, after) if a is not None]
        async with self._conn() as conn:
            rows = await conn.fetch(statement, *args, limit + 1)
        return Page([tq.key_from_row(r) for r in rows[:limit]], len(rows) > limit)

    async def revoke_api_key(self, key_id: str, now: int) -> ApiKeyRecord | None:
        async with self._tx() as conn:
            await conn.execute(pg(tq.REVOKE_KEY), now, key_id)
            row = await conn.fetchrow(pg(tq.GET_KEY), key_id)
        return None if row is None else tq.key_from_row(row)

    async def has_api_keys(self) -> bool:
        async with self._conn() as conn:
            return await conn.fetchval(pg(tq.HAS_KEYS)) is not None

    async def enqueued_input_bytes(self, owner: str, model: str) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(pg(tq.ENQUEUED_BYTES), owner, model))

    async def delete_batch(self, owner: str, batch_id: str) -> BatchRecord | None:
        async with self._tx() as conn:
            b = await self._get_batch(conn, batch_id, lock=True)
            if b is None or b.owner != owner:
                return None
            if b.status in TERMINAL:
                await conn.execute(pg(sql.DELETE_SHARDS), batch_id)
                await conn.execute(pg(sql.DELETE_ENDED_BATCH), batch_id)
            return b

    # -- idempotency keys -----------------------------------------------------------------------------------
    async def claim_idempotency_key(self, rec: IdempotencyKey, live_since: int) -> IdempotencyKey:
        # A conflicting insert waits for the other transaction, so the row read next is the one that won.
        async with self._tx() as conn:
            await conn.execute(pg(sql.PRUNE_IDEMPOTENCY_KEYS), live_since)
            await conn.execute(
                pg(sql.CLAIM_IDEMPOTENCY_KEY),
                rec.owner,
                rec.key,
                rec.route,
                rec.fingerprint,
                rec.object_id,
                rec.created_at,
                live_since,
            )
            row = await conn.fetchrow(pg(sql.GET_IDEMPOTENCY_KEY), rec.owner, rec.key)
        return IdempotencyKey(*row.values())

    async def drop_idempotency_key(self, owner: str, key: str, object_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute(pg(sql.DROP_IDEMPOTENCY_KEY), owner, key, object_id)

    # -- upstream load across machines ----------------------------------------------------------------------
    async def exchange_load(
        self, holder: str, machine: str, loads: Sequence[tuple[str, int, int]], ttl_s: float
    ) -> list[UpstreamLoad]:
        async with self._tx() as conn:
            now = await conn.fetchval(f"SELECT {_now('$1')}", self._t())
            await conn.execute(pg(sql.PRUNE_LOAD), now)
            await conn.executemany(
                pg(sql.PUT_LOAD), [(holder, u, machine, d, f, now + ttl_s) for u, d, f in loads]
            )
            rows = await conn.fetch(pg(sql.OTHERS_LOAD), holder, now)
        return [UpstreamLoad(*r.values()) for r in rows]
