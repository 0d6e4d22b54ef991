"""Rows of the SQL stores (sqlite3.Row, asyncpg.Record: anything indexed by column name) -> records.

Both SQL stores use the same column names, so one mapping serves both.
"""

from __future__ import annotations

import json
from typing import Any

from batchyard.domain.models import (
    BatchRecord,
    FileRecord,
    Outcomes,
    ShardClaim,
    ShardRecord,
    UploadPartRecord,
    UploadRecord,
    Usage,
    WebhookEvent,
)
from batchyard.domain.planning import unpack_spans
from batchyard.domain.states import BatchStatus, ShardStatus, UploadStatus, WebhookStatus

Row = Any  # sqlite3.Row or asyncpg.Record


# A shard attempt's published progress, zeroed when an attempt starts or is given back (SQL SET clauses).
NO_PROGRESS = (
    "completed = 0, failed = 0, expired = 0, input_tokens = 0, cached_tokens = 0, output_tokens = 0, "
    "reasoning_tokens = 0"
)
RELEASED = f"status = '{ShardStatus.PENDING}', lease_owner = NULL, lease_until = NULL, {NO_PROGRESS}"
# A crashed worker's shards: given back, and the crash counts as a failure of each (a poison shard is quarantined).
CRASHED = f"{RELEASED}, failures = failures + 1, last_error = 'the worker process running it died'"

# Records whose fields are their table's columns, one to one: the column list is the mapping.
FILE_FIELDS = (
    "id", "owner", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "blob_key", "sha256"
)  # fmt: skip
UPLOAD_FIELDS = (
    "id", "owner", "filename", "purpose", "bytes", "mime_type", "status", "created_at", "expires_at",
    "file_expires_after", "file_id",
)  # fmt: skip
PART_FIELDS = ("id", "upload_id", "bytes", "blob_key", "created_at")
EVENT_FIELDS = ("id", "batch_id", "owner", "type", "created_at", "attempts", "status")
# The batch columns a new batch is inserted with (the rest start empty), and every column a batch is read from.
BATCH_INSERT_FIELDS = (
    "id", "owner", "endpoint", "input_file_id", "completion_window", "status", "created_at", "expires_at",
    "metadata", "output_expires_after",
)  # fmt: skip
BATCH_FIELDS = (
    *BATCH_INSERT_FIELDS, "model", "output_file_id", "error_file_id", "in_progress_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "errors", "total",
)  # fmt: skip
SHARD_FIELDS = (
    "batch_id", "idx", "start_off", "end_off", "first_line", "line_count", "status", "attempt", "completed",
    "failed", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "out_key", "err_key", "failures",
    "last_error", "spans",
)  # fmt: skip
FILE_COLS, UPLOAD_COLS, PART_COLS, EVENT_COLS, BATCH_INSERT_COLS, BATCH_COLS, SHARD_COLS = (
    ", ".join(f)
    for f in (
        FILE_FIELDS,
        UPLOAD_FIELDS,
        PART_FIELDS,
        EVENT_FIELDS,
        BATCH_INSERT_FIELDS,
        BATCH_FIELDS,
        SHARD_FIELDS,
    )
)


def prefixed(alias: str, fields: tuple[str, ...]) -> str:
    """A column list with a table alias: `s.batch_id, s.idx, ...`."""
    return ", ".join(f"{alias}.{f}" for f in fields)


def values(rec: Any, fields: tuple[str, ...]) -> tuple[Any, ...]:
    """The record's fields, in the order of its column list (for an INSERT)."""
    return tuple(getattr(rec, f) for f in fields)


def file_values(f: FileRecord) -> tuple[Any, ...]:
    return values(f, FILE_FIELDS)


def upload_values(rec: UploadRecord) -> tuple[Any, ...]:
    return values(rec, UPLOAD_FIELDS)


def part_values(part: UploadPartRecord) -> tuple[Any, ...]:
    return values(part, PART_FIELDS)


def batch_values(rec: BatchRecord) -> tuple[Any, ...]:
    """A new batch's INSERT values, in BATCH_INSERT_FIELDS order (metadata as JSON text)."""
    meta = None if rec.metadata is None else json.dumps(rec.metadata)
    return tuple(
        meta if f == "metadata" else str(rec.status) if f == "status" else getattr(rec, f)
        for f in BATCH_INSERT_FIELDS
    )


def fence(claim: ShardClaim) -> tuple[Any, ...]:
    """The values of a fenced shard update's `batch_id = ? AND idx = ? AND attempt = ? AND lease_owner = ?`."""
    return (claim.shard.batch_id, claim.shard.index, claim.attempt, claim.worker)


def usage_values(u: Usage) -> tuple[int, int, int, int]:
    return (u.input_tokens, u.cached_tokens, u.output_tokens, u.reasoning_tokens)


def file_from_row(row: Row) -> FileRecord:
    return FileRecord(**{f: row[f] for f in FILE_FIELDS})


def upload_from_row(row: Row) -> UploadRecord:
    rec = UploadRecord(**{f: row[f] for f in UPLOAD_FIELDS})
    rec.status = UploadStatus(rec.status)
    return rec


def part_from_row(row: Row) -> UploadPartRecord:
    return UploadPartRecord(**{f: row[f] for f in PART_FIELDS})


def event_from_row(row: Row) -> WebhookEvent:
    ev = WebhookEvent(**{f: row[f] for f in EVENT_FIELDS})
    ev.status = WebhookStatus(ev.status)
    return ev


def shard_from_row(row: Row) -> ShardRecord:
    return ShardRecord(
        batch_id=row["batch_id"],
        index=row["idx"],
        start=row["start_off"],
        end=row["end_off"],
        first_line=row["first_line"],
        line_count=row["line_count"],
        status=ShardStatus(row["status"]),
        attempt=row["attempt"],
        completed=row["completed"],
        failed=row["failed"],
        usage=Usage(row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["reasoning_tokens"]),
        out_key=row["out_key"],
        err_key=row["err_key"],
        failures=row["failures"],
        last_error=row["last_error"],
        spans=unpack_spans(row["spans"]),
    )


def batch_from_row(
    row: Row, completed: int, failed: int, usage: Usage, outcomes: Outcomes | None = None
) -> BatchRecord:
    """A batches row; request counts and usage are sums over its shards, which the caller queried."""
    return BatchRecord(
        id=row["id"],
        owner=row["owner"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=BatchStatus(row["status"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        metadata=json.loads(row["metadata"]) if row["metadata"] is not None else None,
        output_expires_after=row["output_expires_after"],
        model=row["model"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        in_progress_at=row["in_progress_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        errors=json.loads(row["errors"]) if row["errors"] is not None else None,
        total=row["total"],
        completed=completed,
        failed=failed,
        usage=usage,
        outcomes=outcomes or Outcomes(),
    )


def claim_from_row(row: Row, attempt: int, worker: str, db_now: float) -> ShardClaim:
    """A claim query's row (the shard's columns as read before the claim, plus `bstatus`, `endpoint`,
    `expires_at`, `blob_key`) -> the claim of `attempt`."""
    shard = shard_from_row(row)
    shard.status, shard.attempt = ShardStatus.RUNNING, attempt
    return ShardClaim(
        shard=shard,
        attempt=attempt,
        worker=worker,
        batch_status=BatchStatus(row["bstatus"]),
        endpoint=row["endpoint"],
        expires_at=row["expires_at"],
        input_blob_key=row["blob_key"],
        db_now=db_now,
        owner=row["bowner"],
        weight=float(row["weight"]),
    )
