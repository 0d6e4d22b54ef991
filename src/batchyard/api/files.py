"""/v1/files: upload (streamed, size-capped), list, retrieve, content (streamed), delete."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batchyard import ids
from batchyard.api.deps import list_body, query_choice, query_int, receiving
from batchyard.api.multipart import ParsedForm, parse_upload
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.domain import limits
from batchyard.domain.models import FileRecord
from batchyard.errors import InvalidRequest, NotFound, PayloadTooLarge

OwnerOf = Callable[[Request], str]


def _expiry(form: ParsedForm, purpose: str, created_at: int) -> int | None:
    anchor = form.fields.get("expires_after[anchor]")
    seconds = form.fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return created_at + limits.BATCH_FILE_DEFAULT_EXPIRY if purpose == "batch" else None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'.", param="expires_after.anchor", code="invalid_value"
        )
    try:
        secs = int(seconds or "")
    except ValueError:
        raise InvalidRequest(
            "expires_after[seconds] must be an integer.", param="expires_after.seconds", code="invalid_value"
        ) from None
    if not limits.FILE_EXPIRY_MIN <= secs <= limits.FILE_EXPIRY_MAX:
        raise InvalidRequest(
            f"expires_after[seconds] must be between {limits.FILE_EXPIRY_MIN} and {limits.FILE_EXPIRY_MAX}.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return created_at + secs


def _disposition(filename: str) -> str:
    # The stored filename stays verbatim; the download hint never carries a path (RFC 6266 section 4.3).
    name = filename.replace("/", "_").replace("\\", "_")
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c != '"' else "_" for c in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


def router(svc: Services, owner_of: OwnerOf) -> APIRouter:
    r = APIRouter()
    settings = svc.settings

    @r.post("/v1/files")
    async def upload(request: Request) -> JSONResponse:
        owner = owner_of(request)
        cap = settings.max_file_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap + 1024 * 1024:
            raise PayloadTooLarge(
                f"The file is too large: the limit is {cap} bytes.", param="file", code="file_too_large"
            )
        fid = ids.file_id()
        async with receiving(
            svc.blobs, f"files/{fid}", field="file", cap=cap, too_large_code="file_too_large"
        ) as sink:
            form = await parse_upload(
                request.headers.get("content-type"), request.stream(), sink.open, max_file_bytes=cap
            )
            purpose = form.fields.get("purpose")
            if purpose is None:
                raise InvalidRequest(
                    "Missing required parameter: 'purpose'.",
                    param="purpose",
                    code="missing_required_parameter",
                )
            if purpose not in limits.FILE_PURPOSES:
                raise InvalidRequest(
                    f"Invalid value for 'purpose': {purpose!r}.", param="purpose", code="invalid_value"
                )
            if form.filename is None or sink.writer is None:
                raise InvalidRequest(
                    "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
                )
            if purpose == "batch" and form.file_bytes > settings.max_batch_file_bytes:
                raise PayloadTooLarge(
                    f"The file is too large: the limit for purpose 'batch' is {settings.max_batch_file_bytes} bytes.",
                    param="file",
                    code="file_too_large",
                )
            created = int(await svc.store.now())
            expires_at = _expiry(form, purpose, created)
            info = await sink.writer.commit()
        rec = FileRecord(
            id=fid,
            owner=owner,
            bytes=info.size,
            created_at=created,
            expires_at=expires_at,
            filename=(form.filename or "file").replace("\x00", "\ufffd"),
            purpose=purpose,
            blob_key=info.key,
            sha256=info.sha256,
        )
        await svc.store.insert_file(rec)
        return JSONResponse(rec.to_wire())

    @r.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        owner = owner_of(request)
        limit = query_int(request, "limit", 10_000, 1, 10_000)
        order = query_choice(request, "order", "desc", ("asc", "desc"))
        page = await svc.store.list_files(
            owner,
            purpose=request.query_params.get("purpose"),
            limit=limit,
            order=order,
            after=request.query_params.get("after"),
        )
        return JSONResponse(list_body([f.to_wire() for f in page.items], page.has_more))

    async def _get(request: Request, file_id: str) -> FileRecord:
        f = await svc.store.get_file(owner_of(request), file_id)
        if f is None:
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
        return f

    @r.get("/v1/files/{file_id}")
    async def retrieve(request: Request, file_id: str) -> JSONResponse:
        return JSONResponse((await _get(request, file_id)).to_wire())

    @r.get("/v1/files/{file_id}/content")
    async def content(request: Request, file_id: str) -> StreamingResponse:
        f = await _get(request, file_id)
        return StreamingResponse(
            svc.blobs.stream(f.blob_key),
            media_type="application/octet-stream",
            headers={"Content-Disposition": _disposition(f.filename), "Content-Length": str(f.bytes)},
        )

    @r.delete("/v1/files/{file_id}")
    async def delete(request: Request, file_id: str) -> JSONResponse:
        res = await svc.store.delete_file(owner_of(request), file_id)
        if res is None:
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
        rec, removable = res
        if removable:
            await svc.blobs.delete(rec.blob_key)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    return r
