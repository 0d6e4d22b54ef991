"""The SQL that the SQLite and PostgreSQL stores share, by name, and the migration files of each.

Statements are written once with SQLite's `?` placeholders; the PostgreSQL store runs `numbered(statement)` (asyncpg
wants `$1, $2, ...`). Booleans are written `NOT deleted` and `= TRUE`, which SQLite reads on its 0/1 columns too.
Statuses come from the domain's enums, written into the text as literals (they are fixed words, and a literal list
lets each database plan the query as before). What differs between the two (the clock, SKIP LOCKED, arrays, the
batch counts) stays in each store.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from importlib import resources

from batchyard.domain.states import (
    ACTIVE,
    FINALIZABLE,
    TERMINAL,
    UNFINISHED,
    VALIDATABLE,
    BatchStatus,
    ShardStatus,
    UploadStatus,
    WebhookStatus,
)
from batchyard.store.rows import (
    BATCH_INSERT_COLS,
    BATCH_INSERT_FIELDS,
    CRASHED,
    FILE_COLS,
    FILE_FIELDS,
    NO_PROGRESS,
    PART_COLS,
    PART_FIELDS,
    SHARD_COLS,
    UPLOAD_COLS,
    UPLOAD_FIELDS,
)


def marks(n: int) -> str:
    return ",".join("?" * n)


def in_list(statuses: Iterable[str]) -> str:
    """A literal SQL list of statuses: `('cancelling', 'in_progress')`."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(statuses)) + ")"


@cache
def numbered(sql: str) -> str:
    """`?` placeholders -> `$1, $2, ...` (no statement here has a `?` inside a literal)."""
    head, *rest = sql.split("?")
    return head + "".join(f"${i}{part}" for i, part in enumerate(rest, 1))


def migrations(dialect: str) -> list[tuple[int, str]]:
    """The numbered migrations of `dialect` ("sqlite" or "postgres"), in order."""
    folder = resources.files("batchyard.store") / "migrations" / dialect
    found = [e for e in folder.iterdir() if e.name.endswith(".sql")]
    return sorted((int(e.name.split("_", 1)[0]), e.read_text()) for e in found)


_PENDING_SHARD, _RUNNING, _DONE = (
    f"'{s}'" for s in (ShardStatus.PENDING, ShardStatus.RUNNING, ShardStatus.DONE)
)
_FENCE = f"batch_id = ? AND idx = ? AND attempt = ? AND lease_owner = ? AND status = {_RUNNING}"

# -- files and uploads -------------------------------------------------------------------------------------------
INSERT_FILE = f"INSERT INTO files ({FILE_COLS}) VALUES ({marks(len(FILE_FIELDS))})"
GET_FILE = f"SELECT {FILE_COLS} FROM files WHERE id = ? AND NOT deleted"
MARK_FILE_DELETED = "UPDATE files SET deleted = TRUE WHERE id = ?"
# Whether a batch not final yet reads file ? (then its blob stays).
FILE_IN_USE = f"SELECT 1 FROM batches WHERE input_file_id = ? AND status IN {in_list(UNFINISHED)} LIMIT 1"
REMOVABLE_DELETED_FILES = (
    f"SELECT {FILE_COLS} FROM files f WHERE deleted AND NOT blob_removed AND NOT EXISTS "
    f"(SELECT 1 FROM batches b WHERE b.input_file_id = f.id AND b.status IN {in_list(UNFINISHED)}) "
    "ORDER BY seq LIMIT ?"
)
FORGET_FILE_BLOB = "UPDATE files SET blob_removed = TRUE WHERE id = ? AND deleted"
INSERT_UPLOAD = f"INSERT INTO uploads ({UPLOAD_COLS}) VALUES ({marks(len(UPLOAD_FIELDS))})"
GET_UPLOAD = f"SELECT {UPLOAD_COLS} FROM uploads WHERE id = ?"
INSERT_PART = f"INSERT INTO upload_parts ({PART_COLS}) VALUES ({marks(len(PART_FIELDS))})"
# The store writes the status the domain chose (`finished_upload`); only a pending upload is finished.
FINISH_UPLOAD = f"UPDATE uploads SET status = ?, file_id = ? WHERE id = ? AND owner = ? AND status = '{UploadStatus.PENDING}'"

# -- webhook events ----------------------------------------------------------------------------------------------
SETTLE_EVENT = (
    "UPDATE webhook_events SET status = ?, next_at = COALESCE(?, next_at), last_error = ?, "
    "attempts = attempts + 1, lease_owner = NULL, lease_until = NULL "
    f"WHERE id = ? AND lease_owner = ? AND status = '{WebhookStatus.PENDING}'"
)

# -- batches and their jobs --------------------------------------------------------------------------------------
INSERT_BATCH = f"INSERT INTO batches ({BATCH_INSERT_COLS}) VALUES ({marks(len(BATCH_INSERT_FIELDS))})"
PLANNED = "UPDATE batches SET planned = TRUE, total = ?, model = ?, job_owner = NULL, job_lease_until = NULL WHERE id = ?"
RELEASE_JOB = "UPDATE batches SET job_owner = NULL, job_lease_until = NULL WHERE id = ? AND job_owner = ?"
RELEASE_WORKER_JOBS = "UPDATE batches SET job_owner = NULL, job_lease_until = NULL WHERE job_owner = ?"
# The batches (alias b) a validation or a finalization job is claimed for.
NEEDS_VALIDATION = f"NOT b.planned AND b.status IN {in_list(VALIDATABLE)}"
NEEDS_FINALIZATION = (
    f"b.planned AND b.status IN {in_list(FINALIZABLE)} AND NOT EXISTS "
    f"(SELECT 1 FROM shards s WHERE s.batch_id = b.id AND s.status <> {_DONE})"
)

# -- shards ------------------------------------------------------------------------------------------------------
# The batches (alias b) whose shards are claimed, cancelling ones first (they only drain).
CLAIMABLE_BATCH = f"b.status IN {in_list(ACTIVE)}"
DRAINING_FIRST = f"b.status = '{BatchStatus.CANCELLING}' DESC"


def claimable_shard(now: str) -> str:
    """A shard (alias s) a claim may take at `now` (the SQL for the store's clock): pending and not paused, or
    running under a lease that ran out."""
    return (
        f"((s.status = {_PENDING_SHARD} AND (s.retry_at IS NULL OR s.retry_at <= {now})) "
        f" OR (s.status = {_RUNNING} AND s.lease_until < {now}))"
    )


def running_shards(now: str) -> str:
    """How many shards of the claimed shard's batch run under a live lease (the claim's fairness order)."""
    return (
        f"(SELECT COUNT(*) FROM shards r WHERE r.batch_id = s.batch_id AND r.status = {_RUNNING} "
        f"AND r.lease_until >= {now})"
    )


def owner_load(now: str) -> str:
    """A derived table `l (owner, n)`: how many shards of each owner's batches run under a live lease."""
    return (
        f"(SELECT rb.owner AS owner, COUNT(*) AS n FROM shards r JOIN batches rb ON rb.id = r.batch_id "
        f"WHERE r.status = {_RUNNING} AND r.lease_until >= {now} GROUP BY rb.owner) l"
    )


# What a claim joins to a shard (alias s) to order it: its batch b, its input file f, the batch owner's project p
# (its weight; an owner that is no project weighs 1) and the owner's load l (see `owner_load`).
CLAIM_JOINS = (
    "JOIN batches b ON b.id = s.batch_id JOIN files f ON f.id = b.input_file_id "
    "LEFT JOIN projects p ON p.id = b.owner LEFT JOIN {load} ON l.owner = b.owner"
)


# The batch owner's weight: its project's (one set to 0 by hand counts as 1, never a division by zero), else 1.
OWNER_WEIGHT = "COALESCE(NULLIF(p.weight, 0), 1.0)"


def claim_order(now: str) -> str:
    """The claim's order (domain/fairshare.py): cancelling batches first (they only drain); then the owner with
    the fewest running shards per unit of weight (weighted fair share across projects, whichever worker claims);
    within an owner the batch with the fewest running shards (no batch of a project starves behind its own big
    one), the earliest deadline first among those, then the oldest; then the lowest shard index."""
    return (
        f"{DRAINING_FIRST}, COALESCE(l.n, 0) / {OWNER_WEIGHT}, {running_shards(now)}, "
        "b.expires_at, b.seq, s.idx"
    )


TAKE_SHARD = (
    f"UPDATE shards SET status = {_RUNNING}, attempt = ?, lease_owner = ?, lease_until = ?, started_at = ?, "
    f"{NO_PROGRESS} "
    "WHERE batch_id = ? AND idx = ?"
)
COMPLETE_SHARD = (
    f"UPDATE shards SET status = {_DONE}, lease_owner = NULL, lease_until = NULL, completed = ?, "
    "failed = ?, expired = ?, input_tokens = ?, cached_tokens = ?, output_tokens = ?, "
    f"reasoning_tokens = ?, out_key = ?, err_key = ?, cancelled = ?, upstream_failed = ? WHERE {_FENCE}"
)
FENCE = _FENCE  # a fenced update's condition: this attempt still holds the shard
RELEASE_WORKER_SHARDS = f"UPDATE shards SET {CRASHED} WHERE lease_owner = ? AND status = {_RUNNING}"
RELEASE_ALL_SHARDS = f"UPDATE shards SET status = {_PENDING_SHARD}, lease_owner = NULL, lease_until = NULL WHERE status = {_RUNNING}"
DONE_SHARDS = f"SELECT {SHARD_COLS} FROM shards WHERE batch_id = ? AND status = {_DONE} ORDER BY idx"
EXPIRED_LINES = "SELECT COALESCE(SUM(expired), 0) FROM shards WHERE batch_id = ?"

DELETE_SHARDS = "DELETE FROM shards WHERE batch_id = ?"
DELETE_ENDED_BATCH = f"DELETE FROM batches WHERE id = ? AND status IN {in_list(TERMINAL)}"

# -- idempotency keys --------------------------------------------------------------------------------------------
IDEMPOTENCY_COLS = "owner, key, route, fingerprint, object_id, created_at"
# Insert-first; a row older than the live window (the last ?) is replaced, a live one is kept.
CLAIM_IDEMPOTENCY_KEY = (
    f"INSERT INTO idempotency_keys ({IDEMPOTENCY_COLS}) VALUES ({marks(6)}) ON CONFLICT (owner, key) DO UPDATE "
    "SET route = excluded.route, fingerprint = excluded.fingerprint, object_id = excluded.object_id, "
    "created_at = excluded.created_at WHERE idempotency_keys.created_at < ?"
)
GET_IDEMPOTENCY_KEY = f"SELECT {IDEMPOTENCY_COLS} FROM idempotency_keys WHERE owner = ? AND key = ?"
DROP_IDEMPOTENCY_KEY = "DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND object_id = ?"
# A few forgotten rows (older than the live window) go at each claim, so the table holds about a day of keys.
PRUNE_IDEMPOTENCY_KEYS = (
    "DELETE FROM idempotency_keys WHERE (owner, key) IN "
    "(SELECT owner, key FROM idempotency_keys WHERE created_at < ? LIMIT 16)"
)

# -- admission control (domain/admission.py) ---------------------------------------------------------------------
SHARD_DONE_AT = "UPDATE shards SET done_at = ? WHERE batch_id = ? AND idx = ?"
# Lines answered (not cancelled or expired) by the shards done since ?, and when the first of them started.
RECENT_THROUGHPUT = (
    "SELECT COALESCE(SUM(completed + failed - expired - cancelled), 0), MIN(started_at) FROM shards "
    "WHERE done_at >= ?"
)
# Input bytes and lines of the batches measured: those in progress and those with a shard done since ?.
MEASURED_LINE_BYTES = (
    "SELECT COALESCE(SUM(f.bytes), 0), COALESCE(SUM(b.total), 0) FROM batches b "
    "JOIN files f ON f.id = b.input_file_id WHERE b.planned AND b.total > 0 AND "
    f"(b.status IN {in_list(ACTIVE)} OR b.id IN (SELECT batch_id FROM shards WHERE done_at >= ?))"
)

# -- aggregates (metrics) ----------------------------------------------------------------------------------------
BATCH_COUNTS = "SELECT status, COUNT(*) FROM batches GROUP BY status"
# Lines not yet answered: of the shards not done (the partial index `shards_open`), of unfinished batches.
LINES_WAITING = (
    "SELECT COALESCE(SUM(s.line_count - s.completed - s.failed), 0) FROM shards s "
    f"JOIN batches b ON b.id = s.batch_id WHERE s.status <> {_DONE} AND b.status IN {in_list(UNFINISHED)}"
)

# The same by owner, with the owner's weight (admission control under fair share, domain/admission.py: `ahead`).
LINES_WAITING_BY_OWNER = (
    f"SELECT b.owner, COALESCE(SUM(s.line_count - s.completed - s.failed), 0), {OWNER_WEIGHT} FROM shards s "
    "JOIN batches b ON b.id = s.batch_id LEFT JOIN projects p ON p.id = b.owner "
    f"WHERE s.status <> {_DONE} AND b.status IN {in_list(UNFINISHED)} GROUP BY b.owner, p.weight ORDER BY b.owner"
)

# upstream load across machines (migration 0011): expired rows go, this holder's rows are upserted, the others read
PRUNE_LOAD = "DELETE FROM upstream_load WHERE expires_at < ?"
PUT_LOAD = (
    "INSERT INTO upstream_load (holder, upstream, machine, demand, in_flight, expires_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (holder, upstream) DO UPDATE SET machine = excluded.machine, demand = excluded.demand, "
    "in_flight = excluded.in_flight, expires_at = excluded.expires_at"
)
OTHERS_LOAD = (
    "SELECT machine, upstream, demand, in_flight FROM upstream_load WHERE holder <> ? AND expires_at >= ? "
    "ORDER BY machine, upstream"
)
