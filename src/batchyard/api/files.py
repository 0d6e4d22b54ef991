"""/v1/files: upload (streamed, size-capped), list, retrieve, content (streamed), delete."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batchyard import ids
from batchyard.api.deps import bad_cursor, list_body, query_choice, query_int, receiving, shown
from batchyard.api.idempotency import REPLAYED, Idempotency, key_of
from batchyard.api.multipart import ParsedForm, parse_upload
from batchyard.api.quotas import Quotas
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.domain import limits
from batchyard.domain.idempotency import fingerprint
from batchyard.domain.models import FileRecord
from batchyard.errors import APIError, BlobNotFound, InvalidRequest, NotFound, PayloadTooLarge

OwnerOf = Callable[[Request], str]
log = logging.getLogger("batchyard.api")

# What a multipart body may carry beside the file (boundaries, part headers, text fields): a Content-Length beyond a
# cap by more than this is refused before the body is read.
FORM_OVERHEAD = 1024 * 1024


def _content_length(request: Request) -> int | None:
    length = request.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


def _too_large(cap: int, purpose: str | None = None) -> PayloadTooLarge:
    scope = f" for purpose {purpose!r}" if purpose else ""
    return PayloadTooLarge(
        f"The file is too large: the limit{scope} is {cap} bytes.", param="file", code="file_too_large"
    )


def _purpose(form: ParsedForm) -> str:
    purpose = form.fields.get("purpose")
    if purpose is None:
        raise InvalidRequest(
            "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
        )
    if purpose not in limits.FILE_PURPOSES:
        raise InvalidRequest(
            f"Invalid value for 'purpose': {shown(purpose, limits.MAX_PURPOSE_CHARS)!r}.",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def _no_such_file(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {shown(file_id)}", param="id", code="file_not_found")


async def _started(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream with its first chunk already read: a blob that cannot be opened fails before any header is sent."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = b""

    async def rest() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for chunk in stream:
            yield chunk

    return rest()


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
    quotas = Quotas(svc.store, settings, svc.rates, svc.holds)
    idem = Idempotency(svc.store)

    async def file_exists(file_id: str) -> bool:
        return await svc.store.get_file(None, file_id) is not None

    @r.post("/v1/files")
    async def upload(request: Request) -> JSONResponse:
        owner = owner_of(request)
        key = key_of(request)
        cap = settings.max_file_bytes
        length = _content_length(request)
        if length is not None and length > cap + FORM_OVERHEAD:
            raise _too_large(cap)
        with quotas.holding(owner) as hold:  # the file, from the first check until it is stored
            usage = await quotas.usage(owner, hold)
            quotas.check_file(usage, max(0, (length or 0) - FORM_OVERHEAD), owner, hold)
            quotas.admit(owner)

            async def on_file(fields: dict[str, str]) -> int | None:
                # The purpose is known before the file when the client sends it first (the openai SDK does): the
                # purpose's cap then applies at once, to the Content-Length and to the stream. Otherwise the overall
                # cap streams and the purpose's is checked at the end.
                if fields.get("purpose") != "batch":
                    return None
                batch_cap = settings.max_batch_file_bytes
                if length is not None and length > batch_cap + FORM_OVERHEAD:
                    raise _too_large(batch_cap, "batch")
                return batch_cap

            fid = ids.file_id()
            async with receiving(
                svc.blobs, f"files/{fid}", field="file", cap=cap, too_large_code="file_too_large"
            ) as sink:
                form = await parse_upload(
                    request.headers.get("content-type"),
                    request.stream(),
                    sink.open,
                    max_file_bytes=cap,
                    on_file=on_file,
                )
                purpose = _purpose(form)
                if form.filename is None or sink.writer is None:
                    raise InvalidRequest(
                        "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
                    )
                if purpose == "batch" and form.file_bytes > settings.max_batch_file_bytes:
                    raise _too_large(settings.max_batch_file_bytes, "batch")
                # again with its real size, and what the owner's other requests hold now (they ran meanwhile)
                quotas.check_file(await quotas.usage(owner, hold), form.file_bytes, owner, hold)
                created = int(await svc.store.now())
                expires_at = _expiry(form, purpose, created)
                info = await sink.writer.commit()
            rec = FileRecord(
                id=fid,
                owner=owner,
                bytes=info.size,
                created_at=created,
                expires_at=expires_at,
                filename=limits.clean_filename(form.filename or "file"),
                purpose=purpose,
                blob_key=info.key,
                sha256=info.sha256,
            )
            if key is not None:
                # the file is streamed: its parameters are known once it is stored; a duplicate's blob goes
                params = {"purpose": purpose, "filename": rec.filename, "sha256": rec.sha256}
                try:
                    earlier = await idem.claim(owner, key, "files", fingerprint(params), fid, file_exists)
                except BaseException:
                    await svc.blobs.delete(info.key)
                    raise
                if earlier is not None:
                    await svc.blobs.delete(info.key)
                    held = await svc.store.get_file(owner, earlier)
                    if held is None:  # deleted since
                        raise _no_such_file(earlier)
                    return JSONResponse(held.to_wire(), headers=REPLAYED)
            async with idem.guard(owner, key, fid):
                await svc.store.insert_file(rec)
            return JSONResponse(rec.to_wire())

    @r.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        owner = owner_of(request)
        limit = query_int(request, "limit", 10_000, 1, 10_000)
        order = query_choice(request, "order", "desc", ("asc", "desc"))
        purpose = request.query_params.get("purpose")
        if purpose is not None and (len(purpose) > limits.MAX_PURPOSE_CHARS or limits.has_control(purpose)):
            raise InvalidRequest(
                f"Invalid value for 'purpose': {shown(purpose, limits.MAX_PURPOSE_CHARS)!r}.",
                param="purpose",
                code="invalid_value",
            )
        if bad_cursor(request, "file"):
            return JSONResponse(list_body([], False))
        page = await svc.store.list_files(
            owner,
            purpose=purpose,
            limit=limit,
            order=order,
            after=request.query_params.get("after"),
        )
        return JSONResponse(list_body([f.to_wire() for f in page.items], page.has_more))

    async def _get(request: Request, file_id: str) -> FileRecord:
        owner = owner_of(request)
        f = await svc.store.get_file(owner, file_id) if ids.has_shape("file", file_id) else None
        if f is None:
            raise _no_such_file(file_id)
        return f

    @r.get("/v1/files/{file_id}")
    async def retrieve(request: Request, file_id: str) -> JSONResponse:
        return JSONResponse((await _get(request, file_id)).to_wire())

    @r.get("/v1/files/{file_id}/content")
    async def content(request: Request, file_id: str) -> StreamingResponse:
        f = await _get(request, file_id)
        if (
            f.purpose in limits.NO_DOWNLOAD_PURPOSES
        ):  # as OpenAI: what was uploaded for a model is not read back
            raise InvalidRequest(
                f"Not allowed to download files of purpose: {f.purpose}", param=None, code=None
            )
        try:
            body = await _started(svc.blobs.stream(f.blob_key))
        except BlobNotFound:
            if await svc.store.get_file(f.owner, f.id) is None:  # deleted meanwhile
                raise _no_such_file(file_id) from None
            log.error("file %s: its blob %s is missing", f.id, f.blob_key)
            raise APIError(
                f"The content of file {f.id} is missing from storage.", code="file_content_missing"
            ) from None
        return StreamingResponse(
            body,
            media_type="application/octet-stream",
            headers={"Content-Disposition": _disposition(f.filename), "Content-Length": str(f.bytes)},
        )

    @r.delete("/v1/files/{file_id}")
    async def delete(request: Request, file_id: str) -> JSONResponse:
        owner = owner_of(request)
        res = await svc.store.delete_file(owner, file_id) if ids.has_shape("file", file_id) else None
        if res is None:
            raise _no_such_file(file_id)
        rec, removable = res
        if removable:
            await svc.blobs.delete(rec.blob_key)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    return r
