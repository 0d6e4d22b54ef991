"""The MetadataStore interface: every query batchyard makes, in one place.

Implementations: `sqlite.SQLiteStore` (default). Leases and timestamps use the store's own clock (for SQLite, the
clock of the machine that holds the database file), never a worker's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from batchyard.domain.admission import AdmissionLoad
from batchyard.domain.idempotency import IdempotencyKey
from batchyard.domain.models import (
    BatchRecord,
    FileRecord,
    ShardClaim,
    ShardRecord,
    ShardResult,
    UploadPartRecord,
    UploadRecord,
    Usage,
    WebhookEvent,
)
from batchyard.domain.states import BatchStatus
from batchyard.domain.tenancy import PROJECT_ID, ApiKeyRecord, KeyHolder, ProjectRecord
from batchyard.domain.validation import ShardPlan
from batchyard.domain.webhooks import DeliveryAttempt, WebhookEndpoint


@dataclass(slots=True)
class Page:
    items: list[Any]
    has_more: bool


@dataclass(slots=True)
class BatchJob:
    """A batch leased to one worker for a batch-level job (validation or finalization)."""

    batch: BatchRecord
    input_file: FileRecord | None  # None when unknown or deleted
    db_now: float


@dataclass(frozen=True, slots=True)
class OwnerUsage:
    """What one key holds, for its caps: live files (not deleted, not expired) and their bytes, pending uploads
    (not expired), batches not yet in a final status."""

    files: int = 0
    stored_bytes: int = 0
    pending_uploads: int = 0
    active_batches: int = 0


class OverEnqueued(Exception):
    """`plan_batch`'s `admit` refused the batch: `enqueued` is what the owner had enqueued of its model."""

    def __init__(self, enqueued: int) -> None:
        super().__init__(f"{enqueued} input bytes enqueued")
        self.enqueued = enqueued


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Aggregates over every batch, for the metrics a scrape shows (`batch_stats`)."""

    by_status: dict[BatchStatus, int]  # how many batches are in each status (absent: none)
    lines_waiting: int  # lines of unfinished batches without an output or error line yet (progress counts)


@dataclass(frozen=True, slots=True)
class UpstreamLoad:
    """One worker process's batch load on one upstream (`exchange_load`)."""

    machine: str
    upstream: str
    demand: int  # lines holding or waiting for a slot
    in_flight: int


@dataclass(slots=True)
class Heartbeat:
    batch_status: BatchStatus
    expires_at: int
    db_now: float


class MetadataStore(ABC):
    # lifecycle
    @abstractmethod
    async def open(self) -> None: ...
    @abstractmethod
    async def close(self) -> None: ...
    @abstractmethod
    async def now(self) -> float: ...

    async def listen(self, on_change: Callable[[str], None]) -> bool:
        """Call `on_change(what)` whenever another process cancels a batch (what: "cancel") or makes new work (a
        batch created or planned: "work"), and once with "work" when the subscription starts, until cancelled; raises StoreError when the subscription breaks (the caller subscribes again).
        Returns False at once when the store cannot push changes (workers then rely on polling and heartbeats).
        PostgreSQL pushes them with LISTEN/NOTIFY, which is how a cancel reaches shards on other machines in
        milliseconds."""
        return False

    # files
    @abstractmethod
    async def insert_file(self, rec: FileRecord) -> None: ...
    @abstractmethod
    async def get_file(self, owner: str | None, file_id: str) -> FileRecord | None: ...
    @abstractmethod
    async def list_files(
        self, owner: str, *, purpose: str | None, limit: int, order: str, after: str | None
    ) -> Page: ...
    @abstractmethod
    async def delete_file(self, owner: str, file_id: str) -> tuple[FileRecord, bool] | None:
        """Mark deleted; returns the record and whether its blob may be removed now (no live batch uses it)."""

    @abstractmethod
    async def expired_files(self, limit: int) -> list[FileRecord]: ...

    # uploads (/v1/uploads): an upload collects parts, then becomes one file
    @abstractmethod
    async def insert_upload(self, rec: UploadRecord) -> None: ...
    @abstractmethod
    async def get_upload(self, owner: str | None, upload_id: str) -> UploadRecord | None: ...
    @abstractmethod
    async def insert_upload_part(self, part: UploadPartRecord) -> None: ...
    @abstractmethod
    async def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        """Every part added to the upload (in no particular order: a completion lists the parts it wants)."""

    @abstractmethod
    async def expired_uploads(self, limit: int) -> list[UploadRecord]:
        """Pending uploads whose `expires_at` has passed (on the store's clock)."""

    @abstractmethod
    async def finish_upload(self, owner: str, upload_id: str, status: str, file: FileRecord | None) -> bool:
        """pending -> `status` ("completed", inserting `file` and linking it; "cancelled"; "expired"), in one
        transaction.
        False (and nothing changed) if the upload is not pending (another request finished it first); any other
        `status` raises IllegalTransition (`domain.states.finished_upload`)."""

    # webhooks: every transition to a final status writes one event in the same transaction (an outbox)
    @abstractmethod
    async def claim_webhook_events(
        self, worker: str, lease_s: float, limit: int, since: int
    ) -> list[WebhookEvent]:
        """Pending events that are due (created at or after `since`), leased to `worker` for delivery."""

    @abstractmethod
    async def settle_webhook_event(
        self, event_id: str, worker: str, status: str, next_at: float | None, error: str | None
    ) -> bool:
        """After a delivery attempt by the lease holder: status "delivered", "abandoned", or "pending" again (then
        due at `next_at`); counts the attempt. False if `worker` no longer holds the event; any other `status`
        raises IllegalTransition (`domain.states.settled_webhook`)."""

    # webhook endpoints per project, and the delivery log (domain/webhooks.py)
    @abstractmethod
    async def insert_webhook_endpoint(self, rec: WebhookEndpoint) -> None: ...
    @abstractmethod
    async def get_webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        """The endpoint (a disabled one too), or None."""

    @abstractmethod
    async def list_webhook_endpoints(
        self, owner: str | None, *, include_disabled: bool
    ) -> list[WebhookEndpoint]:
        """Endpoints (of one owner, or all) in creation order."""

    @abstractmethod
    async def rotate_webhook_secret(
        self, endpoint_id: str, secret: str, previous_until: int
    ) -> WebhookEndpoint | None:
        """The current secret becomes the previous one, still signing until `previous_until`, and `secret` the
        current one; the endpoint afterwards, or None if it is unknown or disabled."""

    @abstractmethod
    async def disable_webhook_endpoint(self, endpoint_id: str, now: int) -> WebhookEndpoint | None:
        """Stamp `disabled_at` (once): nothing more is sent to it. The endpoint afterwards, None if unknown."""

    @abstractmethod
    async def webhook_targets(self, ev: WebhookEvent) -> tuple[list[WebhookEndpoint], set[str]]:
        """Where `ev` goes besides the --webhook-urls: the live endpoints of its owner made at or before it (in
        creation order); and the targets (endpoint ids, `global_...` ids) that took it already (a 2xx attempt)."""

    @abstractmethod
    async def record_webhook_attempts(self, attempts: Sequence[DeliveryAttempt]) -> None:
        """Append attempts to the delivery log."""

    @abstractmethod
    async def list_webhook_events(self, owner: str, *, limit: int, after: str | None) -> Page:
        """`owner`'s events, newest first (an `after` that is not one of its events gives an empty page)."""

    @abstractmethod
    async def get_webhook_event(
        self, owner: str, event_id: str
    ) -> tuple[WebhookEvent, list[DeliveryAttempt]] | None:
        """`owner`'s event and its attempts, oldest first (at most `MAX_ATTEMPTS_SHOWN`); None if unknown or
        another owner's."""

    # batches
    @abstractmethod
    async def insert_batch(self, rec: BatchRecord) -> None: ...
    @abstractmethod
    async def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None: ...
    @abstractmethod
    async def list_batches(self, owner: str, *, limit: int, after: str | None) -> Page: ...
    @abstractmethod
    async def request_cancel(self, owner: str, batch_id: str) -> BatchRecord | None:
        """validating/in_progress -> cancelling; returns the batch as it is afterwards (None if unknown)."""

    # batch-level jobs (validation, finalization), leased like shards
    @abstractmethod
    async def claim_validation(self, worker: str, lease_s: float) -> BatchJob | None: ...
    @abstractmethod
    async def claim_finalization(self, worker: str, lease_s: float) -> BatchJob | None: ...
    @abstractmethod
    async def extend_job(self, batch_id: str, worker: str, lease_s: float) -> bool: ...
    @abstractmethod
    async def plan_batch(
        self,
        batch_id: str,
        worker: str,
        shards: Sequence[ShardPlan],
        total: int,
        model: str | None,
        admit: Callable[[int], bool] | None = None,
    ) -> bool:
        """Insert the shards and move validating -> in_progress (a cancelling batch stays cancelling). Fenced.

        `admit` (with a `model`): called in the same transaction with the input bytes of the owner's other planned
        batches of that model still enqueued (`enqueued_input_bytes`); when it answers False nothing changes and
        `OverEnqueued` is raised. Two batches of one owner planned at the same moment (two workers) are admitted
        one after the other, so they cannot both pass a limit that only one of them fits."""

    @abstractmethod
    async def fail_batch(self, batch_id: str, worker: str, errors: list[dict[str, Any]]) -> bool: ...
    @abstractmethod
    async def begin_finalizing(self, batch_id: str, worker: str) -> BatchRecord | None: ...
    @abstractmethod
    async def done_shards(self, batch_id: str) -> list[ShardRecord]: ...
    @abstractmethod
    async def batch_expired_lines(self, batch_id: str) -> int:
        """How many lines of the batch ended `batch_expired`."""

    @abstractmethod
    async def finish_batch(
        self,
        batch_id: str,
        worker: str,
        status: BatchStatus,
        output_file: FileRecord | None,
        error_file: FileRecord | None,
    ) -> bool: ...

    # shards
    @abstractmethod
    async def claim_shard(
        self, worker: str, lease_s: float, *, not_owners: Collection[str] = ()
    ) -> ShardClaim | None:
        """Lease the next shard in the fair-share order (domain/fairshare.py), or None; `not_owners`: skip the
        batches of these owners (a worker full of their shards takes one of another owner's)."""

    @abstractmethod
    async def heartbeat_shard(
        self, claim: ShardClaim, lease_s: float, completed: int, failed: int, usage: Usage
    ) -> Heartbeat | None:
        """Extend the lease and publish progress; None when the lease was lost (another attempt owns it)."""

    @abstractmethod
    async def release_shard(
        self, claim: ShardClaim, *, retry_in: float = 0.0, failure: str | None = None
    ) -> None:
        """Give a claimed shard back, if this attempt still holds it: at once (graceful shutdown), or not to be
        claimed again for `retry_in` seconds (a dependency is down). `failure`: the attempt failed of this error,
        which counts towards the shard's quarantine (`ShardRecord.failures`, `last_error`)."""

    @abstractmethod
    async def release_job(self, batch_id: str, worker: str) -> None:
        """Give a batch-level job lease back at once."""

    @abstractmethod
    async def release_worker(self, worker: str) -> int:
        """Give back every lease `worker` holds (shards and batch jobs), for a worker known to be dead (its parent
        saw it exit): its work is taken over at once instead of after the lease. The death counts as a failure of
        each of its running shards (one that kills its worker is quarantined). Returns the shards released."""

    @abstractmethod
    async def complete_shard(self, claim: ShardClaim, result: ShardResult, expired: int) -> bool:
        """Fenced commit: only the attempt that holds the lease can mark the shard done."""

    # per-key usage (caps)
    @abstractmethod
    async def owner_usage(self, owner: str) -> OwnerUsage:
        """What `owner` holds now (on the store's clock): see `OwnerUsage`."""

    @abstractmethod
    async def admission_load(self, window_s: float) -> AdmissionLoad:
        """What admission control weighs (domain/admission.py): the backlog of unanswered lines of unfinished
        batches, the lines of shards done in the last `window_s` seconds, when the first of those started, and
        the input bytes and lines of the batches measured."""

    @abstractmethod
    async def batch_stats(self) -> BatchStats:
        """How many batches are in each status, and the backlog: the lines of unfinished batches not answered
        yet (a running shard's answered lines count as answered from its last heartbeat). One cheap aggregate
        query, made at every metrics scrape."""

    # blob lifecycle (sweeper)
    @abstractmethod
    async def removable_deleted_files(self, limit: int) -> list[FileRecord]:
        """Deleted files whose blob is still there (not yet `forget_file_blob`) and that no non-final batch reads:
        their blobs may be removed."""

    @abstractmethod
    async def forget_file_blob(self, file_id: str) -> None:
        """The blob of deleted file `file_id` is gone: `removable_deleted_files` does not offer it again."""

    @abstractmethod
    async def needed_blob_keys(self, keys: Sequence[str]) -> set[str]:
        """Of `keys`, those a record still points to: the blob of a file (deleted or not) not yet forgotten, or a
        part of an upload still pending. (Shard parts are judged by their batch: `batches_done_with`.)"""

    @abstractmethod
    async def batches_done_with(self, batch_ids: Sequence[str]) -> set[str]:
        """Of `batch_ids`, those whose batch is final or unknown: nothing of theirs is written or read any more."""

    # projects and API keys (domain/tenancy.py); `now` is the caller's reading of `now()`
    @abstractmethod
    async def insert_project(self, rec: ProjectRecord) -> bool:
        """Insert a project; False (nothing inserted) when its name is taken."""

    @abstractmethod
    async def get_project(self, project_id: str) -> ProjectRecord | None: ...

    async def owner_weight(self, owner: str) -> float:
        """`owner`'s weight in the fair share: its project's, 1 for a static key or a project gone."""
        project = await self.get_project(owner) if PROJECT_ID.fullmatch(owner) else None
        return project.weight if project is not None else 1.0

    @abstractmethod
    async def project_by_name(self, name: str) -> ProjectRecord | None: ...
    @abstractmethod
    async def list_projects(self, *, limit: int, after: str | None, include_archived: bool) -> Page:
        """Projects in creation order (an unknown `after` gives an empty page)."""

    @abstractmethod
    async def archive_project(self, project_id: str, now: int) -> ProjectRecord | None:
        """Stamp `archived_at` (once: archiving again keeps the first stamp); None if unknown."""

    @abstractmethod
    async def set_project_weight(self, project_id: str, weight: float) -> ProjectRecord | None:
        """Set the project's fair-share weight (checked by `fairshare.weight_problem`); None if unknown."""

    @abstractmethod
    async def insert_api_key(self, rec: ApiKeyRecord) -> None:
        """Insert a key of an existing project."""

    @abstractmethod
    async def key_holder(self, key_hash: str) -> KeyHolder | None:
        """The key stored with this sha256 and its project (revoked or archived ones too), or None."""

    @abstractmethod
    async def list_api_keys(self, project_id: str | None, *, limit: int, after: str | None) -> Page:
        """Keys (of one project, or all) in creation order, revoked ones too."""

    @abstractmethod
    async def revoke_api_key(self, key_id: str, now: int) -> ApiKeyRecord | None:
        """Stamp `revoked_at` (once); the key as it is afterwards, None if unknown."""

    @abstractmethod
    async def has_api_keys(self) -> bool:
        """Whether any key was ever stored (then requests need a key even with no --api-key)."""

    @abstractmethod
    async def enqueued_input_bytes(self, owner: str, model: str) -> int:
        """The input file bytes of `owner`'s planned batches of `model` still running (in progress or cancelling):
        what its enqueued tokens are estimated from (`domain.tenancy.estimated_tokens`)."""

    @abstractmethod
    async def delete_batch(self, owner: str, batch_id: str) -> BatchRecord | None:
        """Remove an ended batch (a status in `TERMINAL`) and its shards, in one transaction; returns the batch as it
        was (None if unknown or another owner's). A batch not ended is returned and left as is: the caller answers
        409. Its files (input, output, error) and its webhook event stay."""

    # idempotency keys (domain/idempotency.py)
    @abstractmethod
    async def claim_idempotency_key(self, rec: IdempotencyKey, live_since: int) -> IdempotencyKey:
        """Insert-first: insert `rec` unless a row for (rec.owner, rec.key) created at or after `live_since` exists
        (an older one is replaced). Returns the row held afterwards: `rec` itself, or the earlier live one. Of
        racing claims of one key exactly one gets its own row back. Each claim also removes up to 16 rows older
        than `live_since` (of any owner), so forgotten keys do not pile up."""

    @abstractmethod
    async def drop_idempotency_key(self, owner: str, key: str, object_id: str) -> None:
        """Remove the row of (owner, key) if it still names `object_id` (its request failed before creating it)."""

    # upstream load across machines (upstreams/online.py, MachineShares)
    @abstractmethod
    async def exchange_load(
        self, holder: str, machine: str, loads: Sequence[tuple[str, int, int]], ttl_s: float
    ) -> list[UpstreamLoad]:
        """Record `holder`'s (upstream, demand, in flight) rows, live for `ttl_s` (the store's clock), and return the
        live rows of every other holder on those upstreams. Rows past their time are removed on the way."""
