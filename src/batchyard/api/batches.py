"""/v1/batches: create, list, retrieve, cancel; and batchyard's extensions (docs/api.md "Extensions"): partial
results, delete, retry, dry run (validate)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from batchyard import ids
from batchyard.api import dry_run, rerun
from batchyard.api.deps import (
    bad_cursor,
    expires_after,
    json_body,
    list_body,
    query_choice,
    query_int,
    required_str,
    shown,
)
from batchyard.api.idempotency import REPLAYED, Idempotency, key_of
from batchyard.api.quotas import Quotas
from batchyard.api.responses import JSONResponse
from batchyard.api.results import ResultReader
from batchyard.api.services import Services
from batchyard.domain import admission, limits
from batchyard.domain.idempotency import fingerprint
from batchyard.domain.models import BatchRecord
from batchyard.domain.rerun import MAX_CODE_CHARS, MAX_CODES
from batchyard.domain.results import Cursor, Kind, decode
from batchyard.domain.states import TERMINAL, BatchStatus
from batchyard.errors import Conflict, InvalidRequest, NotFound

OwnerOf = Callable[[Request], str]
WARNING_HEADER = "x-batchyard-warning"  # admission control's warning on a create answer (docs/scheduling.md)
log = logging.getLogger("batchyard.admission")

_MAX_CUSTOM_ID_CHARS = 4096  # a `custom_id` filter longer than this names no line worth looking for


# POST /v1/batches's fields in the spec (CreateBatchRequest)
_CREATE_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
_VALIDATE_FIELDS = frozenset({"input_file_id", "endpoint"})


def router(svc: Services, owner_of: OwnerOf) -> APIRouter:
    r = APIRouter()
    quotas = Quotas(svc.store, svc.settings, svc.rates, svc.holds)
    idem = Idempotency(svc.store)
    reader = ResultReader(svc.store, svc.blobs)

    async def batch_exists(batch_id: str) -> bool:
        return await svc.store.get_batch(None, batch_id) is not None

    def no_such_batch(batch_id: str) -> NotFound:
        return NotFound(
            f"No batch found with id '{shown(batch_id)}'.", param="batch_id", code="batch_not_found"
        )

    @r.post("/v1/batches")
    async def create(request: Request) -> JSONResponse:
        owner = owner_of(request)
        key = key_of(request)
        body = await json_body(request)
        _refuse_unknown(body, _CREATE_FIELDS)
        input_file_id, endpoint = _file_and_endpoint(body)
        window = required_str(body, "completion_window")
        strict = svc.settings.completion_windows == "openai"
        window_s = limits.parse_completion_window(window) if not strict or window == "24h" else None
        if window_s is None:
            # OpenAI's words; with durations on, batchyard names its extension too
            durations = (
                ""
                if strict
                else " (or, in batchyard, a duration such as '90s', '30m', '2h', '3d' up to 7 days)"
            )
            raise InvalidRequest(
                f"Invalid value: '{shown(window)}'. Supported values are: '24h'{durations}.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = body.get("metadata")
        problem = limits.metadata_problem(metadata)
        if problem is not None:
            message, param, code = problem
            raise InvalidRequest(message, param=param, code=code)
        out_exp = expires_after(body.get("output_expires_after"), "output_expires_after")
        batch_id = ids.batch_id()
        if key is not None:
            earlier = await idem.claim(owner, key, "batches", fingerprint(body), batch_id, batch_exists)
            if earlier is not None:
                b = await svc.store.get_batch(owner, earlier)
                if b is None:  # deleted since
                    raise no_such_batch(earlier)
                return JSONResponse(b.to_wire(), headers=REPLAYED)
        warning = await admission_warning(owner, input_file_id, window_s)
        async with idem.guard(owner, key, batch_id):
            batch = await insert_new(
                BatchRecord(
                    id=batch_id,
                    owner=owner,
                    endpoint=endpoint,
                    input_file_id=input_file_id,
                    completion_window=window,
                    status=BatchStatus.VALIDATING,
                    created_at=0,
                    expires_at=0,
                    metadata=metadata,
                    output_expires_after=out_exp,
                ),
                window_s,
            )
        headers = None if warning is None else {WARNING_HEADER: warning}
        return JSONResponse(batch.to_wire(), headers=headers)

    async def admission_warning(owner: str, input_file_id: str, window_s: int) -> str | None:
        """Why a batch of this input file may not finish within `window_s` (domain/admission.py), or None."""
        if svc.settings.admission == "off":
            return None
        f = await svc.store.get_file(owner, input_file_id)
        if f is None:  # validation fails it, in OpenAI's words
            return None
        load = await svc.store.admission_load(admission.WINDOW_S)
        weight = await svc.store.owner_weight(owner)
        new_lines = admission.estimated_lines(f.bytes, load)
        found = admission.verdict(load, new_lines, window_s, owner=owner, weight=weight)
        if found is None:
            return None
        log.info("admission (%s): %s", svc.settings.admission, found.message())
        return found.message()

    async def insert_new(batch: BatchRecord, window_s: int) -> BatchRecord:
        """Insert a new batch, created now and expiring `window_s` later, once its owner has room for it."""
        with quotas.holding(batch.owner) as hold:
            await quotas.room_for_batch(hold)
            now = int(await svc.store.now())
            batch.created_at, batch.expires_at = now, now + window_s
            await svc.store.insert_batch(batch)
        svc.notify()
        return batch

    @r.get("/v1/batches")
    async def list_batches(request: Request) -> JSONResponse:
        owner = owner_of(request)
        limit = query_int(request, "limit", 20, 1, 100)
        if bad_cursor(request, "batch"):
            return JSONResponse(list_body([], False))
        page = await svc.store.list_batches(owner, limit=limit, after=request.query_params.get("after"))
        return JSONResponse(list_body([b.to_wire() for b in page.items], page.has_more))

    @r.get("/v1/batches/{batch_id}")
    async def retrieve(request: Request, batch_id: str) -> JSONResponse:
        owner = owner_of(request)
        b = await svc.store.get_batch(owner, batch_id) if ids.has_shape("batch", batch_id) else None
        if b is None:
            raise no_such_batch(batch_id)
        return JSONResponse(b.to_wire())

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str) -> JSONResponse:
        owner = owner_of(request)
        b = await svc.store.request_cancel(owner, batch_id) if ids.has_shape("batch", batch_id) else None
        if b is None:
            raise no_such_batch(batch_id)
        if b.status in (
            BatchStatus.COMPLETED,
            BatchStatus.FAILED,
            BatchStatus.EXPIRED,
            BatchStatus.FINALIZING,
        ):
            raise Conflict(
                f"Cannot cancel a batch with status '{b.status}'.",
                param="batch_id",
                code="batch_not_cancellable",
            )
        svc.notify()
        return JSONResponse(b.to_wire())

    async def owned(request: Request, batch_id: str) -> BatchRecord:
        owner = owner_of(request)
        b = await svc.store.get_batch(owner, batch_id) if ids.has_shape("batch", batch_id) else None
        if b is None:
            raise no_such_batch(batch_id)
        return b

    @r.get("/v1/batches/{batch_id}/results")
    async def results(request: Request, batch_id: str) -> Response:
        """Extension: the batch's committed lines so far (JSONL), filtered, a page at a time."""
        b = await owned(request, batch_id)
        status = query_choice(request, "status", "all", ("all", "completed", "failed"))
        kinds = {"all": (Kind.OUTPUT, Kind.ERROR), "completed": (Kind.OUTPUT,), "failed": (Kind.ERROR,)}
        limit = query_int(request, "limit", 1000, 1, 10_000)
        custom_id = request.query_params.get("custom_id")
        if custom_id is not None and len(custom_id) > _MAX_CUSTOM_ID_CHARS:
            raise InvalidRequest(
                "Invalid 'custom_id': string too long.", param="custom_id", code="invalid_value"
            )
        after = request.query_params.get("after")
        cursor = Cursor() if after is None else decode(after)
        if cursor is None:
            raise InvalidRequest(
                "Invalid 'after': not a cursor returned by this endpoint (x-next-cursor).",
                param="after",
                code="invalid_value",
            )
        page = await reader.page(b, cursor, kinds[status], custom_id, limit)
        more = page.full or b.status not in TERMINAL
        return Response(
            b"".join(page.lines),
            media_type="application/jsonl",
            headers={"x-next-cursor": page.cursor.encode(), "x-has-more": "true" if more else "false"},
        )

    @r.post("/v1/batches/validate")
    async def validate(request: Request) -> JSONResponse:
        """Extension: a dry run. The errors a batch of this file would fail with, and its estimated input tokens;
        nothing is created."""
        owner = owner_of(request)
        body = await json_body(request)
        _refuse_unknown(body, _VALIDATE_FIELDS)
        input_file_id, endpoint = _file_and_endpoint(body)
        return JSONResponse(await dry_run.validate(svc, owner, input_file_id, endpoint))

    @r.delete("/v1/batches/{batch_id}")
    async def delete(request: Request, batch_id: str) -> JSONResponse:
        """Extension: remove an ended batch; with `files=true` its output and error files too."""
        owner = owner_of(request)
        with_files = query_choice(request, "files", "false", ("true", "false")) == "true"
        b = await svc.store.delete_batch(owner, batch_id) if ids.has_shape("batch", batch_id) else None
        if b is None:
            raise no_such_batch(batch_id)
        if b.status not in TERMINAL:
            raise Conflict(
                f"Cannot delete a batch with status '{b.status}'.", param="batch_id", code="batch_not_ended"
            )
        gone: list[str] = []
        for fid in (b.output_file_id, b.error_file_id) if with_files else ():
            res = None if fid is None else await svc.store.delete_file(owner, fid)
            if res is not None:
                gone.append(res[0].id)
                if res[1]:
                    await svc.blobs.delete(res[0].blob_key)
        return JSONResponse({"id": b.id, "object": "batch", "deleted": True, "deleted_file_ids": gone})

    @r.post("/v1/batches/{batch_id}/retry")
    async def retry(request: Request, batch_id: str) -> JSONResponse:
        """Extension: a new batch of the failed lines of an ended batch (optionally only those with `codes`)."""
        b = await owned(request, batch_id)
        codes = _retry_codes(await json_body(request) if await _has_body(request) else {})
        if b.status not in TERMINAL:
            raise Conflict(
                f"Cannot retry a batch with status '{b.status}': it has not ended.",
                param="batch_id",
                code="batch_not_ended",
            )
        err = None if b.error_file_id is None else await svc.store.get_file(b.owner, b.error_file_id)
        wanted = set() if err is None else await rerun.failed_ids(svc.blobs, err, codes)
        if not wanted:
            raise InvalidRequest(
                f"Batch {b.id} has no failed lines to retry"
                + ("" if codes is None else " with those codes")
                + ("." if err is not None or b.error_file_id is None else " (its error file was deleted)."),
                param="codes" if codes is not None else None,
                code="no_failed_lines",
            )
        source = await svc.store.get_file(b.owner, b.input_file_id)
        if source is None:
            raise InvalidRequest(
                f"Cannot retry batch {b.id}: its input file {b.input_file_id} was deleted.",
                param="input_file_id",
                code="input_file_deleted",
            )
        with quotas.holding(b.owner) as hold:  # a first look, before the input is written (checked again)
            await quotas.room_for_batch(hold)
        new_input = await rerun.write_input(svc.blobs, b, source, wanted, int(await svc.store.now()))
        if new_input is None:
            raise InvalidRequest(
                f"None of the failed lines of batch {b.id} is in its input file.", code="no_failed_lines"
            )
        await svc.store.insert_file(new_input)
        window_s = limits.parse_completion_window(b.completion_window) or 86400
        batch = await insert_new(
            BatchRecord(
                id=ids.batch_id(),
                owner=b.owner,
                endpoint=b.endpoint,
                input_file_id=new_input.id,
                completion_window=b.completion_window,
                status=BatchStatus.VALIDATING,
                created_at=0,
                expires_at=0,
                metadata=b.metadata,
                output_expires_after=b.output_expires_after,
            ),
            window_s,
        )
        return JSONResponse(batch.to_wire())

    return r


def _refuse_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:  # as OpenAI's request validation answers an unknown field
            raise InvalidRequest(
                f"Unknown parameter: '{shown(str(name), 64)}'.",
                param=shown(str(name), 64),
                code="unknown_parameter",
            )


def _file_and_endpoint(body: dict[str, Any]) -> tuple[str, str]:
    input_file_id = required_str(body, "input_file_id")
    if not ids.has_shape("file", input_file_id):
        raise InvalidRequest(
            f"Invalid 'input_file_id': {shown(input_file_id)!r} is not a file id.",
            param="input_file_id",
            code="invalid_value",
        )
    endpoint = required_str(body, "endpoint")
    if endpoint not in limits.ENDPOINTS:
        raise InvalidRequest(
            f"Invalid value: '{shown(endpoint)}'. Supported values are: {limits.supported_endpoints()}.",
            param="endpoint",
            code="invalid_value",
        )
    return input_file_id, endpoint


async def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return length != "0" if length is not None else "transfer-encoding" in request.headers


def _retry_codes(body: dict[str, Any]) -> frozenset[str] | None:
    for name in body:
        if name != "codes":
            raise InvalidRequest(
                f"Unknown parameter: '{shown(str(name), 64)}'.",
                param=shown(str(name), 64),
                code="unknown_parameter",
            )
    codes = body.get("codes")
    if codes is None:
        return None
    if (
        not isinstance(codes, list)
        or not 1 <= len(codes) <= MAX_CODES
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_CODE_CHARS for c in codes)
    ):
        raise InvalidRequest(
            f"Invalid 'codes': expected a list of 1 to {MAX_CODES} non-empty strings.",
            param="codes",
            code="invalid_value",
        )
    return frozenset(codes)
