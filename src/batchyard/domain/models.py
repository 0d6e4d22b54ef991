"""Records the stores keep. Plain dataclasses: no I/O, no framework."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchyard.domain.planning import Span
from batchyard.domain.states import BatchStatus, WebhookStatus


@dataclass(slots=True)
class FileRecord:
    id: str
    owner: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    blob_key: str
    sha256: str = ""
    expires_at: int | None = None
    status: str = "processed"

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "status_details": None,
        }


@dataclass(slots=True)
class UploadRecord:
    """A /v1/uploads object. `status` is stored as pending, completed or cancelled; a pending upload past
    `expires_at` reads as expired (`status_at`)."""

    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    created_at: int
    expires_at: int
    status: str = "pending"
    file_expires_after: int | None = None  # expires_after[seconds] for the file the upload becomes
    file_id: str | None = None

    def status_at(self, now: float) -> str:
        return "expired" if self.status == "pending" and now >= self.expires_at else self.status

    def to_wire(self, now: float, file: FileRecord | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "upload",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status_at(now),
            "expires_at": self.expires_at,
            "file": file.to_wire() if file is not None else None,
        }


@dataclass(slots=True)
class UploadPartRecord:
    id: str
    upload_id: str
    bytes: int
    blob_key: str
    created_at: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "upload.part",
            "created_at": self.created_at,
            "upload_id": self.upload_id,
        }


@dataclass(slots=True)
class WebhookEvent:
    """One batch webhook (batch.completed / failed / expired / cancelled) in the outbox."""

    id: str
    batch_id: str
    owner: str
    type: str
    created_at: int
    attempts: int = 0
    status: WebhookStatus = WebhookStatus.PENDING

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "event",
            "type": self.type,
            "created_at": self.created_at,
            "data": {"id": self.batch_id},
        }

    def to_log_wire(self) -> dict[str, Any]:
        """The event as its project reads it in the delivery log (`GET /v1/webhook_events`): the payload sent,
        and where its delivery stands (batchyard extensions)."""
        return {**self.to_wire(), "status": str(self.status), "attempts": self.attempts}


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens

    def to_wire(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.input_tokens + self.output_tokens,
        }


@dataclass(slots=True)
class BatchRecord:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    output_expires_after: int | None = None
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    outcomes: Outcomes = field(default_factory=lambda: Outcomes())

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": str(self.status),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
                **self.outcomes.to_wire(self.completed),
            },
            "usage": self.usage.to_wire(),
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Per-outcome counts of a batch's committed shards (request_counts' extension fields, as Anthropic's batches
    report them): `failed` is split into lines the upstream answered with an error, lines that ended
    `batch_expired` or `batch_cancelled`, and the rest (`errored`: timeouts, connection failures, bad answers)."""

    failed_upstream: int = 0
    expired: int = 0
    cancelled: int = 0
    committed_failed: int = 0  # error lines of committed shards (the live `failed` counts running ones too)

    def to_wire(self, completed: int) -> dict[str, int]:
        return {
            "succeeded": completed,
            "failed_upstream": self.failed_upstream,
            "expired": self.expired,
            "cancelled": self.cancelled,
            "errored": max(0, self.committed_failed - self.failed_upstream - self.expired - self.cancelled),
        }


@dataclass(slots=True)
class ShardRecord:
    batch_id: str
    index: int
    start: int
    end: int
    first_line: int
    line_count: int
    status: str = "pending"  # pending | running | done
    attempt: int = 0
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    out_key: str | None = None
    err_key: str | None = None
    failures: int = 0  # attempts that failed for a reason other than a lost lease (quarantined at a limit)
    last_error: str | None = None  # what the last failed attempt died of
    spans: tuple[
        Span, ...
    ] = ()  # a shard planned from spans of the file (domain/planning.py); () = start..end

    def ranges(self) -> tuple[Span, ...]:
        """The byte spans of the input file to read, in order."""
        return self.spans or (Span(self.start, self.end, self.first_line),)


@dataclass(slots=True)
class ShardClaim:
    """A shard leased to one worker for one attempt, with what the worker needs to run it."""

    shard: ShardRecord
    attempt: int
    worker: str
    batch_status: BatchStatus
    endpoint: str
    expires_at: int
    input_blob_key: str
    db_now: float
    owner: str = ""  # the batch's owner (a project id for stored keys): its key in the fair share
    weight: float = 1.0  # the owner's weight (a project's `weight`; 1 for owners that are no project)


@dataclass(slots=True)
class ShardResult:
    completed: int
    failed: int
    usage: Usage
    out_key: str | None
    err_key: str | None
    cancelled: int = 0  # lines that ended batch_cancelled
    upstream_failed: int = 0  # lines the upstream answered with a non-2xx status
