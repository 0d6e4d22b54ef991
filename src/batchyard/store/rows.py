"""Rows of the SQL stores (sqlite3.Row, asyncpg.Record: anything indexed by column name) -> records.

Both SQL stores use the same column names, so one mapping serves both.
"""

from __future__ import annotations

import json
from typing import Any

from batchyard.domain.models import (
    BatchRecord,
    FileRecord,
    ShardRecord,
    UploadPartRecord,
    UploadRecord,
    Usage,
    WebhookEvent,
)
from batchyard.domain.states import BatchStatus

Row = Any  # sqlite3.Row or asyncpg.Record


FILE_COLS = "id, owner, bytes, created_at, expires_at, filename, purpose, status, blob_key, sha256"


def file_values(f: FileRecord) -> tuple[Any, ...]:
    """`f` as the values of FILE_COLS, in order."""
    return (
        f.id,
        f.owner,
        f.bytes,
        f.created_at,
        f.expires_at,
        f.filename,
        f.purpose,
        f.status,
        f.blob_key,
        f.sha256,
    )


UPLOAD_COLS = "id, owner, filename, purpose, bytes, mime_type, status, created_at, expires_at, file_expires_after, file_id"
PART_COLS = "id, upload_id, bytes, blob_key, created_at"


def upload_values(rec: UploadRecord) -> tuple[Any, ...]:
    """`rec` as the values of UPLOAD_COLS, in order."""
    return (
        rec.id,
        rec.owner,
        rec.filename,
        rec.purpose,
        rec.bytes,
        rec.mime_type,
        rec.status,
        rec.created_at,
        rec.expires_at,
        rec.file_expires_after,
        rec.file_id,
    )


def upload_from_row(row: Row) -> UploadRecord:
    return UploadRecord(
        id=row["id"],
        owner=row["owner"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=row["bytes"],
        mime_type=row["mime_type"],
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        file_expires_after=row["file_expires_after"],
        file_id=row["file_id"],
    )


def part_from_row(row: Row) -> UploadPartRecord:
    return UploadPartRecord(
        id=row["id"],
        upload_id=row["upload_id"],
        bytes=row["bytes"],
        blob_key=row["blob_key"],
        created_at=row["created_at"],
    )


EVENT_COLS = "id, batch_id, owner, type, created_at, attempts"


def event_from_row(row: Row) -> WebhookEvent:
    return WebhookEvent(
        id=row["id"],
        batch_id=row["batch_id"],
        owner=row["owner"],
        type=row["type"],
        created_at=row["created_at"],
        attempts=row["attempts"],
    )


def file_from_row(row: Row) -> FileRecord:
    return FileRecord(
        id=row["id"],
        owner=row["owner"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        status=row["status"],
        blob_key=row["blob_key"],
        sha256=row["sha256"],
    )


def shard_from_row(row: Row) -> ShardRecord:
    return ShardRecord(
        batch_id=row["batch_id"],
        index=row["idx"],
        start=row["start_off"],
        end=row["end_off"],
        first_line=row["first_line"],
        line_count=row["line_count"],
        status=row["status"],
        attempt=row["attempt"],
        completed=row["completed"],
        failed=row["failed"],
        usage=Usage(row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["reasoning_tokens"]),
        out_key=row["out_key"],
        err_key=row["err_key"],
    )


def batch_from_row(row: Row, completed: int, failed: int, usage: Usage) -> BatchRecord:
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
    )
