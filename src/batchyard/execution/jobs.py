"""Batch-level jobs: validation (plan shards or fail) and finalization (compose the output and error files)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from batchyard import metrics
from batchyard.blobs.base import BlobInfo, BlobStore
from batchyard.config import Settings
from batchyard.domain import admission, tenancy
from batchyard.domain.models import BatchRecord, FileRecord, ShardRecord
from batchyard.domain.rerun import custom_id_of
from batchyard.domain.states import BatchStatus
from batchyard.domain.validation import BatchValidator, iter_lines
from batchyard.errors import BlobNotFound
from batchyard.execution.containment import describe
from batchyard.store.base import BatchJob, MetadataStore, OverEnqueued
from batchyard.upstreams.router import Router

log = logging.getLogger("batchyard.jobs")
S = BatchStatus


def derived_file_id(batch_id: str, kind: str) -> str:
    """Output/error file ids derived from the batch id, so a finalizer that re-runs after a crash is idempotent."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


@contextlib.asynccontextmanager
async def keep_job_lease(
    store: MetadataStore, batch_id: str, worker: str, lease_s: float
) -> AsyncIterator[None]:
    async def extend() -> None:
        while True:
            await asyncio.sleep(max(0.2, lease_s / 3.0))
            await store.extend_job(batch_id, worker, lease_s)

    task = asyncio.create_task(extend(), name=f"job-lease-{batch_id}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def fail_unexpectedly(job: BatchJob, store: MetadataStore, worker: str, e: BaseException) -> None:
    """End a batch whose validation raised (a bug, or an input nothing foresaw) as failed, with the reason."""
    message = f"The batch could not be validated: batchyard failed on its input file ({describe(e, 300)})."
    await store.fail_batch(
        job.batch.id, worker, [{"code": "internal_error", "message": message, "param": None, "line": None}]
    )
    metrics.validation_done("failed")


def _file_error(message: str) -> list[dict[str, Any]]:
    return [{"code": "invalid_request", "message": message, "param": "file_id", "line": None}]


async def validate(
    job: BatchJob, store: MetadataStore, blobs: BlobStore, router: Router, settings: Settings, worker: str
) -> None:
    planned = await _validate(job, store, blobs, router, settings, worker)
    metrics.validation_done("planned" if planned else "failed")


async def _validate(
    job: BatchJob, store: MetadataStore, blobs: BlobStore, router: Router, settings: Settings, worker: str
) -> bool:
    """True when the batch was planned, False when it failed validation."""
    batch, f = job.batch, job.input_file
    if f is None or f.owner != batch.owner:  # unknown, another owner's, or deleted
        # OpenAI's words; its organization is the owner here (a key's hash name, never the key)
        missing = f"Cannot find file {batch.input_file_id}, or organization {batch.owner} does not have access to it."
        await store.fail_batch(batch.id, worker, _file_error(missing))
        return False
    if f.purpose != "batch":
        msg = f"The input file {f.id} must be uploaded with purpose 'batch', not '{f.purpose}'."
        await store.fail_batch(batch.id, worker, _file_error(msg))
        return False
    v = BatchValidator(
        batch.endpoint,
        router.is_routable,
        max_lines=settings.max_lines,
        max_bytes=settings.max_batch_file_bytes,
        shard_lines=settings.shard_lines,
        shard_bytes=settings.shard_bytes,
        # output in input order needs shards of contiguous lines: no regrouping across the file
        prefix_planning=settings.prefix_ordering and settings.output_order == "shard",
    )
    async with keep_job_lease(store, batch.id, worker, settings.lease_seconds):
        try:
            async for chunk in blobs.stream(f.blob_key):
                metrics.validation_read(len(chunk))
                v.feed(chunk)
        except BlobNotFound:
            await store.fail_batch(batch.id, worker, _file_error(f"The input file {f.id} has no content."))
            return False
        result = v.finish()
    if not result.ok:
        errors = [
            {"code": e.code, "message": e.message, "param": e.param, "line": e.line} for e in result.errors
        ]
        await store.fail_batch(batch.id, worker, errors)
        log.info("batch %s failed validation with %d errors", batch.id, result.error_count)
        return False
    limit, model = settings.project_max_enqueued_tokens, result.model
    more = tenancy.estimated_tokens(f.bytes)

    def problem(enqueued_bytes: int) -> str | None:
        assert model is not None
        return tenancy.enqueued_token_problem(
            model, batch.owner, tenancy.estimated_tokens(enqueued_bytes), more, limit
        )

    if settings.admission == "reject" and await _queue_full(job, store, result.total_lines, worker):
        return False
    try:
        # the limit is checked in the planning's own transaction: batches planned at once are counted in turn
        await store.plan_batch(
            batch.id,
            worker,
            result.shards,
            result.total_lines,
            model,
            admit=(lambda enqueued: problem(enqueued) is None) if model is not None and limit > 0 else None,
        )
    except OverEnqueued as over:
        refused = [
            {"code": "token_limit_exceeded", "message": problem(over.enqueued), "param": None, "line": None}
        ]
        await store.fail_batch(batch.id, worker, refused)
        return False
    log.info("batch %s planned: %d lines in %d shards", batch.id, result.total_lines, len(result.shards))
    return True


async def _queue_full(job: BatchJob, store: MetadataStore, lines: int, worker: str) -> bool:
    """Admission control (domain/admission.py): fail the batch when the backlog and its `lines` cannot finish before
    its deadline at the measured throughput, with the code OpenAI gives a batch its queue cannot take."""
    load = await store.admission_load(admission.WINDOW_S)
    owner = job.batch.owner
    weight = await store.owner_weight(owner)
    # what fair share serves before this batch's last line: its project's backlog, and of each other's, what that
    # project's weight is served meanwhile (as the create check counts it: api/batches.py)
    window = max(0, job.batch.expires_at - int(load.now))
    found = admission.verdict(load, lines, window, owner=owner, weight=weight)
    if found is None:
        return False
    log.info("batch %s refused by admission control: %s", job.batch.id, found.message())
    full = [{"code": "token_limit_exceeded", "message": found.message(), "param": None, "line": None}]
    await store.fail_batch(job.batch.id, worker, full)
    return True


async def _compose(
    blobs: BlobStore, batch: BatchRecord, kind: str, keys: list[str], created_at: int
) -> FileRecord | None:
    if not keys:
        return None
    fid = derived_file_id(batch.id, kind)
    info: BlobInfo = await blobs.compose(f"files/{fid}", keys)
    expires = None if batch.output_expires_after is None else created_at + batch.output_expires_after
    return FileRecord(
        id=fid,
        owner=batch.owner,
        bytes=info.size,
        created_at=created_at,
        expires_at=expires,
        filename=f"{batch.id}_{kind}.jsonl",
        purpose="batch_output",
        blob_key=info.key,
        sha256=info.sha256,
    )


async def _in_input_order(blobs: BlobStore, input_key: str, shard: ShardRecord, part_key: str) -> str:
    """A copy of a shard's part with its lines in the order of their input lines (a shard is small: read whole)."""
    data = await blobs.read_range(input_key, shard.start, shard.end)
    order: dict[str | None, int] = {}
    for i, (_, raw) in enumerate(iter_lines(data, shard.first_line)):
        order.setdefault(custom_id_of(raw), i)
    part = b"".join([chunk async for chunk in blobs.stream(part_key)])
    lines = [line + b"\n" for line in part.split(b"\n") if line]
    lines.sort(key=lambda line: order.get(custom_id_of(line), len(order)))
    key = f"{part_key}.ordered"
    writer = await blobs.open_writer(key)
    try:
        for line in lines:
            await writer.write(line)
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    return key


async def _parts(
    blobs: BlobStore, job: BatchJob, shards: list[ShardRecord], settings: Settings, kind: str
) -> list[str]:
    """The part keys to concatenate into the `kind` file, in shard order; with `--output-order input`, copies of
    them in input order (contiguous shards only: a batch planned from spans, or whose input file is gone, keeps
    shard order)."""
    keys = [(s, s.out_key if kind == "output" else s.err_key) for s in shards]
    parts = [(s, k) for s, k in keys if k]
    f = job.input_file
    if settings.output_order != "input" or f is None or any(s.spans for s in shards):
        return [k for _, k in parts]
    return [await _in_input_order(blobs, f.blob_key, s, k) for s, k in parts]


async def finalize(
    job: BatchJob, store: MetadataStore, blobs: BlobStore, settings: Settings, worker: str
) -> None:
    batch = await store.begin_finalizing(job.batch.id, worker)
    if batch is None:
        return
    async with keep_job_lease(store, batch.id, worker, settings.lease_seconds):
        shards = await store.done_shards(batch.id)
        now = int(await store.now())
        out_keys = await _parts(blobs, job, shards, settings, "output")
        err_keys = await _parts(blobs, job, shards, settings, "error")
        out = await _compose(blobs, batch, "output", out_keys, now)
        err = await _compose(blobs, batch, "error", err_keys, now)
        if batch.status == S.CANCELLING:
            final = S.CANCELLED
        elif await store.batch_expired_lines(batch.id) > 0:
            final = S.EXPIRED
        else:
            final = S.COMPLETED
        if not await store.finish_batch(batch.id, worker, final, out, err):
            return
    for s in shards:
        for key in (s.out_key, s.err_key):
            if key:
                await blobs.delete(key)
    for key in {*out_keys, *err_keys} - {k for s in shards for k in (s.out_key, s.err_key)}:
        await blobs.delete(key)  # the copies in input order
    log.info("batch %s %s", batch.id, final)
