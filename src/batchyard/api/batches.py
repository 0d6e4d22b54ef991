"""/v1/batches: create, list, retrieve, cancel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request

from batchyard import ids
from batchyard.api.deps import list_body, query_int
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.domain import limits
from batchyard.domain.models import BatchRecord
from batchyard.domain.states import BatchStatus
from batchyard.errors import Conflict, InvalidRequest, NotFound

OwnerOf = Callable[[Request], str]
MAX_CREATE_BODY = 1024 * 1024


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    if not isinstance(value, str) or not value:
        raise InvalidRequest(
            f"Invalid type for '{name}': expected a non-empty string.", param=name, code="invalid_type"
        )
    return value


def _output_expiry(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise InvalidRequest(
            "output_expires_after.anchor must be 'created_at'.",
            param="output_expires_after.anchor",
            code="invalid_value",
        )
    seconds = value.get("seconds")
    if (
        not isinstance(seconds, int)
        or isinstance(seconds, bool)
        or not limits.FILE_EXPIRY_MIN <= seconds <= limits.FILE_EXPIRY_MAX
    ):
        raise InvalidRequest(
            f"output_expires_after.seconds must be an integer between {limits.FILE_EXPIRY_MIN} and "
            f"{limits.FILE_EXPIRY_MAX}.",
            param="output_expires_after.seconds",
            code="invalid_value",
        )
    return seconds


async def _json_body(request: Request) -> dict[str, Any]:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_CREATE_BODY:
            raise InvalidRequest("The request body is too large.", code="invalid_request")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def router(svc: Services, owner_of: OwnerOf) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/batches")
    async def create(request: Request) -> JSONResponse:
        owner = owner_of(request)
        body = await _json_body(request)
        input_file_id = _required_str(body, "input_file_id")
        endpoint = _required_str(body, "endpoint")
        if endpoint not in limits.ENDPOINTS:
            raise InvalidRequest(
                f"Invalid value for 'endpoint': {endpoint!r}. Supported: {', '.join(limits.ENDPOINTS)}.",
                param="endpoint",
                code="invalid_value",
            )
        window = _required_str(body, "completion_window")
        window_s = limits.parse_completion_window(window)
        if window_s is None:
            raise InvalidRequest(
                f"Invalid value for 'completion_window': {window!r}. Use '24h' (or, in batchyard, a duration such "
                "as '90s', '30m', '2h', '3d' up to 7 days).",
                param="completion_window",
                code="invalid_value",
            )
        metadata = body.get("metadata")
        problem = limits.metadata_problem(metadata)
        if problem is not None:
            raise InvalidRequest(problem, param="metadata", code="invalid_value")
        out_exp = _output_expiry(body.get("output_expires_after"))
        now = int(await svc.store.now())
        batch = BatchRecord(
            id=ids.batch_id(),
            owner=owner,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=window,
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + window_s,
            metadata=metadata,
            output_expires_after=out_exp,
        )
        await svc.store.insert_batch(batch)
        svc.notify()
        return JSONResponse(batch.to_wire())

    @r.get("/v1/batches")
    async def list_batches(request: Request) -> JSONResponse:
        owner = owner_of(request)
        limit = query_int(request, "limit", 20, 1, 100)
        page = await svc.store.list_batches(owner, limit=limit, after=request.query_params.get("after"))
        return JSONResponse(list_body([b.to_wire() for b in page.items], page.has_more))

    @r.get("/v1/batches/{batch_id}")
    async def retrieve(request: Request, batch_id: str) -> JSONResponse:
        b = await svc.store.get_batch(owner_of(request), batch_id)
        if b is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
        return JSONResponse(b.to_wire())

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str) -> JSONResponse:
        b = await svc.store.request_cancel(owner_of(request), batch_id)
        if b is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
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

    return r
